"""Data: corpora, cleaning, language ID, deduplication, PII, decontamination, packing.

The stages of ``lmforge data prepare`` (see :mod:`lmforge.data.pipeline`), each usable
on its own::

    from lmforge.data.corpora import load_source        # D1: documents from wiki/news/files
    from lmforge.data.clean import clean_text, quality_reasons   # D2
    from lmforge.data.langid import identify_language    # D2
    from lmforge.data.dedup import MinHasher, NearDuplicateIndex # D3
    from lmforge.data.pii import redact_pii              # D4
    from lmforge.data.decontam import Decontaminator     # D5
    from lmforge.data.scorecard import Scorecard         # D6
    from lmforge.data.pack import ShardWriter, PackedDataset     # D7
    from lmforge.data.formats import load_records        # D7: SFT / preference / classification

Importing this package is cheap: NumPy is imported only by the modules that need it.
"""
