"""video_ens: EnsembleNet (shared base, N light branches, co-distillation) for video and images at scale.

Imports flow one way: typed_json, dist, durable -> model_options -> sections -> config -> kernels -> models, data
-> objective, metrics -> engine -> trainer -> train.
Importing the package pulls in none of DeepSpeed, Triton, WebDataset or a video decoder.
"""

__version__ = "0.1.0"
