"""FID: uint8 images -> a frozen feature extractor -> float64 running statistics -> Frechet distance.

In three parts, re-exported here: eval/fid_extractors.py (the extractors and their weights),
eval/fid_stats.py (statistics and image batches), eval/fid_reference.py (reference protocols and their
cached statistics, FID against them).

Two extractors behind one small interface (`FeatureExtractor`):
- `inception`: torch-fidelity's `inception-v3-compat` (TF 2015-12-05 weights, 2048-d pool features), the
  network behind the reference TF FID; it resizes to 299 internally with TF1's bilinear rule.
- `shapes`: the ShapesT2I domain extractor of eval/shapes_features.py (its penultimate layer).

Reference statistics are cached under a name hashing the whole protocol (data set, split, N, seed, crop, resize
filter, resolution, extractor, weights checksum), so a changed setting can never reuse stale numbers.
"""
from __future__ import annotations

from eval.fid_extractors import (  # noqa: F401
    INCEPTION_WEIGHTS_FILE, INCEPTION_URL, INCEPTION_NAME, FeatureExtractor, inception_weights_path,
    InceptionFeatures, load_extractor)
from eval.fid_stats import (  # noqa: F401
    FeatureStats, frechet_distance, fid_between, _check_batch, extract_stats, batches_from_dataset,
    batches_from_files, image_files)
from eval.fid_reference import (  # noqa: F401
    STATS_VERSION, ReferenceProtocol, reference_protocol, _source, reference_key, reference_path, ReferenceStats,
    load_reference_stats, compute_reference_stats, fid_from_images, default_cache_dir)
from harness.hashing import sha256_file  # noqa: F401 - its home; importable from here as before
