"""Vision and vision-language models (V1-V2): image encoders (a ViT built from lmforge's
Transformer blocks, a small CNN), supervised classifiers, and a CLIP-style dual encoder
trained on Fashion-MNIST with captions generated from labels and measured attributes.

    fashion_mnist.py  the idx reader, class names, pixel attributes, captions and prompts
    encoders.py       ViT, CNN, the classifier head and the text encoder
    clip.py           the dual encoder, symmetric InfoNCE, zero-shot and retrieval
    train.py          configurations, the training run, checkpoints and evaluation
"""
