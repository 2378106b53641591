"""Train MoCo-v2 with non-semantic negatives (fastneg's lean DDP trainer):
`python -m fastneg.train`, or the script train/moco.py (a thin entry to this package, also
under torchrun).

    python train/moco.py                                   # one process, embedded data
    torchrun --standalone --nproc_per_node=1 train/moco.py --loader dali      # = make train
    torchrun --standalone --nproc_per_node=8 train/moco.py --preset paper-in100 --data IN100
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train/moco.py --preset paper-in100 --data IN100   # per node

Data: --data ROOT follows MoCo's convention, ROOT/train is an ImageFolder (class/image.jpg);
for --loader ffcv the trainer reads ROOT/train.beton and makes it on first use with
`fastneg convert`. Without --data: the embedded shapes dataset, generated on first use.
Multi-node runs need --data on a shared or per-node copy. --data may also name tar shards in the
WebDataset layout (`fastneg convert --to wds`, or your own: a folder, 'train-{0000..0146}.tar',
a URL or 'pipe:curl -s URL'), read by --loader dali and torch; each rank reads its own shards.

Processes: one per GPU (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; init is env://, NCCL on
GPUs, gloo on CPUs); plain `python train/moco.py` runs one process. --batch-size is the global
batch, split evenly over the processes. BatchNorm for keys and NS: --bn shuffle (MoCo's
shuffle-BN across ranks; a no-op in one process) or --bn sync (SyncBatchNorm, GPUs only).

Step: loader (two random-resized crops, uint8) -> aug-plus on the device (two views) -> patch
NS from the augmented query and/or texture NS (the image's own texture from --texture-bank,
given the query's augmentation draws) -> loss (docs/method.md; alpha inside the exponent) -> SGD
(momentum 0.9, weight decay --wd) with linear warmup and a cosine schedule, per step.

Learning rate: --lr is the rate for a global batch of 256; the optimizer uses
lr * batch_size / 256 (linear scaling, Goyal et al. 2017).

Defaults: without a GPU they fit the embedded dataset on 2 CPU cores in a few minutes
(resnet10s at 64 px, batch 128, K 1024, m 0.99, fp32); with a GPU: resnet18 at 96 px, batch
256, bf16. Presets (explicit flags still win):
  paper-in100       Ge et al. 2021 on ImageNet-100: resnet50, 224 px, batch 128, actual lr 0.03
                    (--lr 0.06), 200 epochs, no warmup, K 16384, m 0.999, T 0.2, alpha 2,
                    patch NS 16..72 px, bf16. Needs --data.
  paper-in100-b512  the same with batch 512, actual lr 0.8 (--lr 0.4), m 0.99.

Outputs in --out RUN_DIR (default runs/moco-<date>-<time>): checkpoint.pt (latest) and
checkpoint_epochNNN.pt (every --save-every epochs), written atomically; log.csv (and TensorBoard
events when tensorboard is installed); batch.png (a batch's views and negatives, as the model
sees them before normalisation); summary.json (img/s, data-wait %, final loss, and with --eval
the linear-probe and out-of-domain results). --resume RUN_DIR continues a run: every random
draw is a function of (--seed, step), so a resumed run ends with the same weights as an
uninterrupted one (bit for bit on CPU in fp32 with the same process count).

Modules: config (flags, defaults, presets, --resume's rules), runlog (log.csv, TensorBoard, the
progress bar, summary.json, batch.png), checkpoints (what a checkpoint holds, when one is
written) and loop (processes, data, model, and the training loop: train() and main()).
"""
import os

# (OMP_WAIT_POLICY=PASSIVE is set by importing fastneg, before this package imports torch.)
# The NS kernels' per-sample draw launches are a few blocks by design (one thread per sample);
# Numba would warn about their grid size on every GPU run. Read when numba.cuda loads.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
