"""Vision and vision-language models (V1-V3): image encoders (a ViT built from lmforge's
Transformer blocks, a small CNN), supervised classifiers, and a CLIP-style dual encoder
trained on Fashion-MNIST with captions generated from labels and measured attributes.

    fashion_mnist.py  the idx reader, class names, pixel attributes, captions and prompts
    encoders.py       ViT, CNN, the classifier head and the text encoder
    clip.py           the dual encoder, symmetric InfoNCE, zero-shot and retrieval
    hf_clip.py        the dual encoder in the Hugging Face CLIPModel layout (save and load)
    hf_vit.py         the ViT classifier as ViTForImageClassification (save and load)
    hf_llava.py       the captioning/VQA model as LlavaForConditionalGeneration (save and load)
    hf_layouts.py     which layout a checkpoint maps to; export and loading of those directories
    captioner.py      the LLaVA-style captioning and VQA model, its training and decoding
    connectors.py     MLP projector, cross-attention, gated cross-attention, query resampler
    config.py         the training run's settings (flags of lmforge vlm train)
    train.py          the training run, checkpoints and evaluation
"""
