"""qws_jax: quantized weight sharing for JAX.

k-means weight sharing (Deep Compression) and hashed weight sharing (HashedNets) as pure
functions over parameter pytrees, with kernels, training helpers and checkpoints.
"""

from qws_jax._src.apply import apply
from qws_jax._src.calibrate import LeafStats
from qws_jax._src.calibrate import calibrate
from qws_jax._src.checkpoint import CheckpointManager
from qws_jax._src.checkpoint import restore
from qws_jax._src.checkpoint import save
from qws_jax._src.hash_share import hash_share
from qws_jax._src.kmeans import KMeansResult
from qws_jax._src.kmeans import kmeans
from qws_jax._src.prune import prune
from qws_jax._src.prune import prune_optimizer
from qws_jax._src.report import Report
from qws_jax._src.report import report
from qws_jax._src.sharding import compressed_shardings
from qws_jax._src.share import share
from qws_jax._src.mixed import share_mixed
from qws_jax._src.share import unshare
from qws_jax._src.train import canonicalize
from qws_jax._src.train import codebook_optimizer
from qws_jax._src.tree import Rule
from qws_jax._src.types import HashedArray
from qws_jax._src.types import SharedArray
from qws_jax._src.types import validate_hashed_array
from qws_jax._src.types import validate_shared_array
# Sub-packages, so that `import qws_jax` gives `qws_jax.kernels`, `.linen` and `.nnx`.
from qws_jax import kernels
from qws_jax import linen
from qws_jax import nnx

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "HashedArray",
    "KMeansResult",
    "LeafStats",
    "Report",
    "Rule",
    "SharedArray",
    "apply",
    "calibrate",
    "canonicalize",
    "codebook_optimizer",
    "compressed_shardings",
    "hash_share",
    "kernels",
    "kmeans",
    "linen",
    "nnx",
    "prune",
    "prune_optimizer",
    "report",
    "restore",
    "save",
    "share",
    "share_mixed",
    "unshare",
    "validate_hashed_array",
    "validate_shared_array",
]
