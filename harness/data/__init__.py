"""Data: ShapesT2I (procedural, embedded default) and loaders for MS-COCO captions and WebDataset shards."""
