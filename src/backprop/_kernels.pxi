# The tables of compiled kinds: one row per layer kind, loss and optimizer rule, each
# naming the kernels that run it.  This is the only place the compiled core lists kinds;
# the passes call through these tables, the Python side finds a kind's row by its name
# (KERNELS, LOSS_KERNELS, RULES) when a network is planned, and a name not here is
# refused then, never run by some default branch.  Adding a kind: its kernel file, one
# row here, and its Python declaration (backprop/layers/, losses.py, optim.py).
from backprop._ops cimport Kernel, no_scratch
from backprop._dense cimport dense_run, dense_back, dense_scratch
from backprop._batchnorm cimport batchnorm_run, batchnorm_back
from backprop._layernorm cimport layernorm_run, layernorm_back
from backprop._dropout cimport dropout_run, dropout_back
from backprop._residual cimport residual_run, identity_run, identity_back
from backprop._relayout cimport relayout_run, relayout_back
from backprop._conv cimport conv_run, conv_back, conv_scratch
from backprop._pool cimport max_pool_run, max_pool_back, avg_pool_run, avg_pool_back
from backprop._embedding cimport embedding_run, embedding_back
from backprop._recurrent cimport (recurrent_run, recurrent_back, recurrent_scratch,
                                  last_step_run, last_step_back, CELL_RNN, CELL_LSTM, CELL_GRU,
                                  RNN_GATES, RNN_KEPT, LSTM_GATES, LSTM_KEPT, GRU_GATES,
                                  GRU_KEPT)
from backprop._losses cimport (LossKernel, mse_loss, binary_cross_entropy_loss,
                               cross_entropy_loss)
from backprop._optim cimport (Rule, sgd_range, sgd_bound, adam_range, adam_bound, rmsprop_range,
                             rmsprop_bound, adagrad_range, adagrad_bound)

cdef enum:
    N_KERNELS = 13
    N_LOSS_KERNELS = 3
    N_RULES = 4

cdef Kernel KERNEL_TABLE[N_KERNELS]
KERNEL_TABLE[0] = Kernel(b"dense", dense_run[float], dense_run[double],
                         dense_back[float], dense_back[double], dense_scratch)
KERNEL_TABLE[1] = Kernel(b"batchnorm", batchnorm_run[float], batchnorm_run[double],
                         batchnorm_back[float], batchnorm_back[double], no_scratch)
KERNEL_TABLE[2] = Kernel(b"layernorm", layernorm_run[float], layernorm_run[double],
                         layernorm_back[float], layernorm_back[double], no_scratch)
KERNEL_TABLE[3] = Kernel(b"dropout", dropout_run[float], dropout_run[double],
                         dropout_back[float], dropout_back[double], no_scratch)
KERNEL_TABLE[4] = Kernel(b"activation", identity_run[float], identity_run[double],
                         identity_back[float], identity_back[double], no_scratch)
KERNEL_TABLE[5] = Kernel(b"residual", residual_run[float], residual_run[double],
                         identity_back[float], identity_back[double], no_scratch)
KERNEL_TABLE[6] = Kernel(b"relayout", relayout_run[float], relayout_run[double],
                         relayout_back[float], relayout_back[double], no_scratch)
KERNEL_TABLE[7] = Kernel(b"conv", conv_run[float], conv_run[double],
                         conv_back[float], conv_back[double], conv_scratch)
KERNEL_TABLE[8] = Kernel(b"max_pool", max_pool_run[float], max_pool_run[double],
                         max_pool_back[float], max_pool_back[double], no_scratch)
KERNEL_TABLE[9] = Kernel(b"avg_pool", avg_pool_run[float], avg_pool_run[double],
                         avg_pool_back[float], avg_pool_back[double], no_scratch)
KERNEL_TABLE[10] = Kernel(b"embedding", embedding_run[float], embedding_run[double],
                          embedding_back[float], embedding_back[double], no_scratch)
KERNEL_TABLE[11] = Kernel(b"recurrent", recurrent_run[float], recurrent_run[double],
                          recurrent_back[float], recurrent_back[double], recurrent_scratch)
KERNEL_TABLE[12] = Kernel(b"last_step", last_step_run[float], last_step_run[double],
                          last_step_back[float], last_step_back[double], no_scratch)

cdef LossKernel LOSS_TABLE[N_LOSS_KERNELS]
LOSS_TABLE[0] = LossKernel(b"mse", mse_loss[float], mse_loss[double])
LOSS_TABLE[1] = LossKernel(b"binary_cross_entropy", binary_cross_entropy_loss[float],
                           binary_cross_entropy_loss[double])
LOSS_TABLE[2] = LossKernel(b"cross_entropy", cross_entropy_loss[float],
                           cross_entropy_loss[double])

cdef Rule RULE_TABLE[N_RULES]
RULE_TABLE[0] = Rule(b"sgd", 1, sgd_range[float, uint32_t], sgd_range[double, uint64_t],
                     sgd_bound)
RULE_TABLE[1] = Rule(b"adam", 3, adam_range[float, uint32_t], adam_range[double, uint64_t],
                     adam_bound)
RULE_TABLE[2] = Rule(b"rmsprop", 3, rmsprop_range[float, uint32_t],
                     rmsprop_range[double, uint64_t], rmsprop_bound)
RULE_TABLE[3] = Rule(b"adagrad", 1, adagrad_range[float, uint32_t],
                     adagrad_range[double, uint64_t], adagrad_bound)


cdef bint _complete_kernel(const Kernel* k) noexcept:
    return (k.name != NULL and k.forward32 != NULL and k.forward64 != NULL
            and k.backward32 != NULL and k.backward64 != NULL and k.scratch != NULL)


# A row left empty (a count raised without its row) must stop the import, not run.
for _i in range(N_KERNELS):
    if not _complete_kernel(&KERNEL_TABLE[_i]):
        raise ImportError(f"backprop: row {_i} of the kernel table is incomplete")
for _i in range(N_LOSS_KERNELS):
    if LOSS_TABLE[_i].name == NULL or not LOSS_TABLE[_i].value32 or not LOSS_TABLE[_i].value64:
        raise ImportError(f"backprop: row {_i} of the loss table is incomplete")
for _i in range(N_RULES):
    if (RULE_TABLE[_i].name == NULL or not RULE_TABLE[_i].update32
            or not RULE_TABLE[_i].update64 or not RULE_TABLE[_i].bound):
        raise ImportError(f"backprop: row {_i} of the rule table is incomplete")

# name -> row, for the planner, the Engine and the optimizers.
KERNELS = {KERNEL_TABLE[i].name.decode(): i for i in range(N_KERNELS)}
LOSS_KERNELS = {LOSS_TABLE[i].name.decode(): i for i in range(N_LOSS_KERNELS)}
RULES = {RULE_TABLE[i].name.decode(): i for i in range(N_RULES)}

# The cells of the recurrent row (_recurrent.pxd): name -> (its code in a record, rows of
# W_ih and W_hh and values the backward keeps per step, each per hidden unit).  The layers
# take their shapes and saved area from here, so the two sides cannot disagree.
RECURRENT_CELLS = {"rnn": (CELL_RNN, RNN_GATES, RNN_KEPT),
                   "lstm": (CELL_LSTM, LSTM_GATES, LSTM_KEPT),
                   "gru": (CELL_GRU, GRU_GATES, GRU_KEPT)}


def _op_fields():
    """The fields of a tape record (Op in _ops.pxd), nested ones as dicts: the planner
    must fill exactly these (a dict with other keys would be read without them)."""
    cdef Op op
    memset(&op, 0, sizeof(Op))
    return dict(op)
