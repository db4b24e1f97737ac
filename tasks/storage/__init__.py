"""Files the stages write and read: atomic writes, video I/O, the WebVid CSV, clip and latent
shard formats, MP4/GIF previews."""
