"""Host syncs per training step, on a real NVIDIA GPU only (marker cuda).

torch.cuda.set_sync_debug_mode("warn") makes torch warn "called a synchronizing CUDA operation"
at every sync it makes through its own wrappers (.item(), .cpu(), copies to pageable host
memory, Stream.synchronize(), nonzero, ...); warnings raised in the autograd engine's device
threads are replayed in the caller's thread after backward. It does not see syncs made by other
libraries (Numba's driver calls) nor torch.cuda.synchronize(): the data half is also checked by
ordering (a long busy-wait is queued on the stream first; the host must be back before it ends).

Each budget is the number of syncs the code makes on purpose, every one listed; a new sync in
the hot path fails the test and names the file:line torch blamed.
"""
import math
import warnings
from argparse import Namespace

import pytest
import torch

pytestmark = pytest.mark.cuda

SYNC = "called a synchronizing CUDA operation"
SIZE, BATCH = 64, 32
# torch.cuda._sleep spins this many GPU clock cycles: about a second at an H100's ~2 GHz, far
# longer than the host needs to queue one step's data work once the kernels are compiled
SLEEP_CYCLES = 2 ** 31


def count_syncs(fn):
    """(fn(), the file:line of every host sync torch reported while fn ran)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, [f"{w.filename}:{w.lineno}" for w in caught if SYNC in str(w.message)]


def gpu_batch(n=BATCH, size=SIZE, seed=0):
    from fastneg.loaders import Batch
    g = torch.Generator().manual_seed(seed)
    views = tuple(torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
                  .cuda() for _ in range(2))
    indices = torch.arange(n).cuda()
    return Batch(views, torch.zeros(n, dtype=torch.int64).cuda(), indices)


class DeviceBank:
    """A texture bank held whole on the GPU (what TextureBank.for_batch returns for one)."""

    def __init__(self, rows=8, size=80):
        g = torch.Generator().manual_seed(1)
        self.textures = torch.randint(0, 256, (rows, size, size, 3), generator=g,
                                      dtype=torch.uint8).cuda()

    def for_batch(self, indices):
        return self.textures, indices % self.textures.shape[0]


def test_views_and_negatives_make_no_host_sync():
    from fastneg.augment import MoCoV2Augment
    from fastneg.step import make_views_and_negatives, scaled_patch_range
    batch = gpu_batch()
    kw = dict(aug=MoCoV2Augment(dtype=torch.bfloat16), seed=0, negatives="both",
              patch_range=scaled_patch_range(SIZE), textures=DeviceBank())
    make_views_and_negatives(batch, step=0, **kw)     # compiles the kernels (not counted)
    (views, made), syncs = count_syncs(lambda: make_views_and_negatives(batch, step=1, **kw))
    # Budget 0: the draws reach the GPU by non-blocking copies from pinned memory, the kernels
    # run on the current stream, the texture ids are not range-checked on the GPU.
    assert syncs == [], f"host syncs in make_views_and_negatives: {syncs}"
    assert [v.shape for v in views + made] == [(BATCH, 3, SIZE, SIZE)] * 4
    assert all(v.dtype == torch.bfloat16 and v.is_cuda for v in views + made)
    # What torch cannot see (the Numba launches): the host must not wait for queued GPU work.
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    make_views_and_negatives(batch, step=2, **kw)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy, "make_views_and_negatives waited for the GPU (a sync outside torch?)"


def _trainer():
    from fastneg.train import loop
    return loop


# Syncs of one step the trainer makes on purpose:
#   fp16: 1, GradScaler.step reads found_inf (torch/amp/grad_scaler.py, _maybe_opt_step .item())
#   bf16: 0 (no GradScaler; the loss is summed on the device by RunLog.step_done)
# plus, on a log step only (step % log_every == 0): 1, RunLog._write's loss_sum.item().
# One process: no stop agreement (rundir.StopRequest.agreed all-reduces only when distributed).
STEP_SYNCS = {"bf16": 0, "fp16": 1}
LOG_SYNCS = 1


@pytest.mark.parametrize("precision", sorted(STEP_SYNCS))
def test_a_training_step_syncs_only_where_the_trainer_means_to(precision, tmp_path):
    trainer = _trainer()
    device = torch.device("cuda", torch.cuda.current_device())
    from fastneg.step import scaled_patch_range
    from fastneg.train.config import DEFAULTS, DEVICE_DEFAULTS
    settings = {**DEFAULTS, **DEVICE_DEFAULTS["cuda"], "arch": "resnet18",
                "size": SIZE, "batch_size": BATCH, "precision": precision, "bn": "split",
                "patch_range": list(scaled_patch_range(SIZE)), "device": "cuda"}
    args = Namespace(**settings)
    procs = trainer.Processes(world=1, rank=0, local_rank=0, local_world=1, device=device,
                              distributed=False)
    model, train_model, optimizer, scaler, _ = trainer.build_training_model(args, procs, None)
    views_and_negatives = trainer.step_inputs(args, procs, tmp_path)
    amp_dtype = trainer.PRECISIONS[precision]
    autocast = torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None)
    log_every, steps_per_epoch = 4, 100
    run_log = trainer.RunLog(tmp_path, main=False, device=device, batch_size=BATCH,
                             log_every=log_every, total_steps=steps_per_epoch, start_step=0)
    batch = gpu_batch()

    def step(s):
        """The body of the trainer's loop (fastneg.train.loop.train), minus the data wait."""
        trainer.set_learning_rate(optimizer, trainer.learning_rate(args, s, steps_per_epoch))
        views, negatives = views_and_negatives(batch, step=s)
        loss = trainer.train_step(train_model, optimizer, scaler, autocast, views, negatives, s)
        run_log.step_done(s + 1, 0, loss, 0.0, optimizer.param_groups[0]["lr"])
        return loss

    step(0)       # compiles kernels, creates momentum buffers and the scaler's state
    _, syncs = count_syncs(lambda: [step(s) for s in (1, 2)])     # steps 2 and 3: no log
    assert len(syncs) <= 2 * STEP_SYNCS[precision], \
        f"{precision}: {len(syncs)} host syncs in 2 steps, budget {2 * STEP_SYNCS[precision]}: " \
        f"{syncs}"
    loss, syncs = count_syncs(lambda: step(3))                     # step 4 logs
    assert len(syncs) <= STEP_SYNCS[precision] + LOG_SYNCS, \
        f"{precision}: {len(syncs)} host syncs in a log step: {syncs}"
    assert torch.isfinite(loss).item() and math.isfinite(run_log.final_loss)
    assert model.queue_ptr.item() == 4 * BATCH % model.K
