"""StoryGen-style frame generator: SD 1.5 UNet with an added cross-attention over previous frames."""
