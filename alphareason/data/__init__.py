"""Datasets: TFDS builders (array_record, no TensorFlow) and numpy batch loaders."""

from alphareason.data.builder import DataSpec, ReasoningDataset, build_dataset, make_spec, split_problems
from alphareason.data.loader import BatchIterator, collate, decode_record, encode_example, load_records

__all__ = ["DataSpec", "ReasoningDataset", "build_dataset", "make_spec", "split_problems",
           "BatchIterator", "collate", "decode_record", "encode_example", "load_records"]
