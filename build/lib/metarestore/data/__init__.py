"""Images (folders or the embedded samples) and the episode sampler built on them."""

from metarestore.data.episodes import Episode, EpisodeBatch, EpisodeSampler, PatchSampler, TaskSpec, dihedral
from metarestore.data.images import (
    EMBEDDED,
    DataError,
    ImageSet,
    absolute_source,
    load_embedded,
    load_folder,
    load_images,
    read_image,
    write_image,
)

__all__ = ["EMBEDDED", "DataError", "Episode", "EpisodeBatch", "EpisodeSampler", "ImageSet", "PatchSampler", "TaskSpec",
           "absolute_source", "dihedral", "load_embedded", "load_folder", "load_images", "read_image", "write_image"]
