"""Importing this module registers every built-in stage type."""

import compress.distill.stage  # noqa: F401
import compress.export.stage  # noqa: F401
import compress.prune.stage  # noqa: F401
import compress.ptq.stage  # noqa: F401
import compress.qat.stage  # noqa: F401
import compress.sparsity.stage  # noqa: F401
import compress.stages.train  # noqa: F401
