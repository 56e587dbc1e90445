"""Stage 1 of MMFT: a labelled image dataset -> a captioned one (image, label, captions, provenance).

Nothing here imports `mmft_hf.training` or `mmft_hf.classification`: captioners know nothing of CLIP.
"""
