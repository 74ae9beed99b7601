"""`titanax.data`: deterministic, sharded, resumable input pipelines on Grain.

A `Pipeline` turns a random-access source into a global stream of batches: sample
`g` is sample `g % N` of epoch `g // N`, shuffled by `(seed, epoch)`; each process
reads only its rows of every global batch (from the mesh and the plan's data axes);
a run resumes at any global sample index in O(1), with any process count or
data-parallel size.
"""

from .._errors import DataError as DataError
from ._pipeline import BatchIterator as BatchIterator
from ._pipeline import Pipeline as Pipeline
from ._rows import process_rows as process_rows
from ._sources import ArraySource as ArraySource
from ._sources import ByteTokenizer as ByteTokenizer
from ._sources import TextWindows as TextWindows
from ._sources import TokenWindows as TokenWindows
from ._sources import as_source as as_source

__all__ = [
    "ArraySource",
    "BatchIterator",
    "ByteTokenizer",
    "DataError",
    "Pipeline",
    "TextWindows",
    "TokenWindows",
    "as_source",
    "process_rows",
]
