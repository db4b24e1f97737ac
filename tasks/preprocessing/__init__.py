"""The per-video and per-shard work of the data stages: the synthetic demo set, assessing a
video (filter), cutting clips (decode), encoding latent shards (cache_latents), and new CSV rows
for a scheduled retrain."""
