"""The toy-only models: builders and trainers of the models that `make toy` trains for the evaluation.

The tiny CLIP (CLIP metrics, and the toy diffusion base's text encoder), the text-only LM baseline, the
frame classifier (character and background accuracy) and a tiny random object detector. The toy LLaVA
base and diffusion base are pretrained by their own stages (``llava_ft``, ``storygen_ft``).
"""
