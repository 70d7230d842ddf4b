"""Small multilingual texts written for lmforge: a held-out set for language identification
tests and for the tokenizer quality report (how a tokenizer trained on English copes
with other scripts). A few sentences per language on everyday topics, no real persons."""

from __future__ import annotations

MULTILINGUAL_SAMPLES: dict[str, list[str]] = {
    "en": [
        "The library opens at nine in the morning and closes at six in the evening. "
        "On weekends the reading room is quieter, and many students come to work on their projects.",
        "When the train was delayed again, the passengers waited on the platform and talked about the weather.",
    ],
    "de": [
        "Die Bibliothek öffnet um neun Uhr morgens und schließt um sechs Uhr abends. "
        "Am Wochenende ist der Lesesaal ruhiger, und viele Studenten arbeiten dort an ihren Projekten.",
        "Als der Zug wieder Verspätung hatte, warteten die Fahrgäste auf dem Bahnsteig und sprachen über das Wetter.",
    ],
    "fr": [
        "La bibliothèque ouvre à neuf heures du matin et ferme à six heures du soir. "
        "Le week-end, la salle de lecture est plus calme et beaucoup d'étudiants viennent y travailler.",
        "Quand le train a de nouveau eu du retard, les voyageurs ont attendu sur le quai en parlant du temps.",
    ],
    "es": [
        "La biblioteca abre a las nueve de la mañana y cierra a las seis de la tarde. "
        "Los fines de semana la sala de lectura está más tranquila y muchos estudiantes trabajan allí.",
        "Cuando el tren volvió a retrasarse, los pasajeros esperaron en el andén y hablaron del tiempo.",
    ],
    "ru": [
        "Библиотека открывается в девять часов утра и закрывается в шесть часов вечера. "
        "По выходным в читальном зале тише, и многие студенты приходят туда работать над своими проектами.",
        "Когда поезд снова задержался, пассажиры ждали на платформе и говорили о погоде.",
    ],
    "el": [
        "Η βιβλιοθήκη ανοίγει στις εννέα το πρωί και κλείνει στις έξι το απόγευμα. "
        "Τα Σαββατοκύριακα η αίθουσα ανάγνωσης είναι πιο ήσυχη.",
        "Όταν το τρένο καθυστέρησε ξανά, οι επιβάτες περίμεναν στην αποβάθρα και μιλούσαν για τον καιρό.",
    ],
    "ar": [
        "تفتح المكتبة في الساعة التاسعة صباحا وتغلق في الساعة السادسة مساء. "
        "في عطلة نهاية الأسبوع تكون قاعة القراءة أهدأ، ويأتي كثير من الطلاب للعمل على مشاريعهم.",
        "عندما تأخر القطار مرة أخرى، انتظر الركاب على الرصيف وتحدثوا عن الطقس.",
    ],
    "hi": [
        "पुस्तकालय सुबह नौ बजे खुलता है और शाम छह बजे बंद होता है। "
        "सप्ताहांत में पढ़ने का कमरा शांत रहता है और कई छात्र वहाँ अपने काम पर आते हैं।",
        "जब ट्रेन फिर से देर से आई, तो यात्री प्लेटफ़ॉर्म पर इंतज़ार करते हुए मौसम के बारे में बात करते रहे।",
    ],
    "zh": [
        "图书馆早上九点开门，晚上六点关门。周末的时候阅览室比较安静，很多学生来这里做自己的项目。",
        "火车又一次晚点了，乘客们在站台上等着，聊着天气。",
    ],
    "ja": [
        "図書館は朝九時に開いて、夜六時に閉まります。週末は閲覧室が静かなので、多くの学生がそこで課題に取り組みます。",
        "電車がまた遅れたので、乗客たちはホームで待ちながら天気の話をしていました。",
    ],
    "ko": [
        "도서관은 아침 아홉 시에 문을 열고 저녁 여섯 시에 문을 닫습니다. 주말에는 열람실이 더 조용해서 많은 학생들이 그곳에서 공부합니다.",
        "기차가 또 늦어지자 승객들은 승강장에서 기다리며 날씨 이야기를 했습니다.",
    ],
}
