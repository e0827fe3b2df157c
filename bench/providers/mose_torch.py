"""MoSE providers that run anywhere: the floor, the PyTorch backend and the eager baselines."""

from functools import partial

from mosear_fast import mose_lora
from tests.baselines import mose_dense_masked, mose_naive_group_loop

from ..registry import Provider, register
from ..setups import linear_floor, mose_setup

register(Provider("mose", "linear", linear_floor, description="base F.linear alone (floor)"))
register(Provider("mose", "mosear_torch", mose_setup(partial(mose_lora, backend="torch")),
                  description="mose_lora, PyTorch backend (grouped matmuls)"))
register(Provider("mose", "naive_loop", mose_setup(mose_naive_group_loop),
                  description="per-(modality, expert) loop: index_select, matmul, index_add"))
register(Provider("mose", "dense_masked", mose_setup(mose_dense_masked),
                  description="every expert on every token, masked by a dense gate"))
