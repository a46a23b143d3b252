"""The training loop: step, log, evaluate, checkpoint. The four engine calls stay visible in `_train_step`.

Data contract. The trainer reads batches, dicts with
    "inputs"  (B, ...) model input          "target"  (B,) class indices or (B, C) multi-hot
    "ids"     list of B sample ids          "lengths" (B,) valid frames (features only; optional)
from a train stream with `batches(epoch, start)`, an iterator over the micro-batches of one nominal epoch of this
rank beginning at micro-batch `start`, and `micro_batches_per_epoch`. The stream must be a pure function of
(seed, rank, epoch, position): that is what lets a resumed run reproduce the per-step losses of an uninterrupted
one, since the trainer restarts the epoch's iterator at the exact micro-batch the checkpoint recorded. The eval
stream yields every evaluation sample once across ranks (`batches()`) and knows `num_classes`.

Run folder: recipe.json (resolved), metrics.jsonl, tb/, checkpoints/, eval.json, model.safetensors (and with
train.loggers the trackers' trackers.json, wandb/, mlruns/).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from . import dist
from .config import RESUME_UNREPORTED, RecipeError, flatten_recipe, recipe_to_dict
from .data.transforms import to_model_input
from .evaluate import evaluate
from .optim import lr_at, set_lr
from .progress import format_duration, gather_bad_samples

LOG = dist.get_logger("video_ens.trainer")

# Signals that ask a run to stop early but cleanly: SIGTERM (torchrun passes it on when it is told to stop; SLURM
# sends it at preemption and at the time limit) and SIGUSR1 (what `sbatch --signal=USR1@90` sends ahead of the end).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """Raised by Trainer.fit after a stop signal: the step in progress finished on every rank and was checkpointed,
    so relaunching the same command resumes from exactly there."""

    def __init__(self, step: int, signame: str) -> None:
        super().__init__(f"{signame} received: stopped after step {step}, which is checkpointed")
        self.step, self.signame = step, signame


class MetricsLog:
    """metrics.jsonl (append, one JSON object per line, flushed) and TensorBoard scalars, on rank 0 only; the same
    scalars also go to the trackers of train.loggers (video_ens/trackers.py: W&B, MLflow), which get `config`, the
    resolved recipe, as their run's config."""

    def __init__(self, run_dir: Path, *, loggers: list[str] | tuple[str, ...] = (), config: dict | None = None) -> None:
        self.enabled = dist.is_main()
        self._file = None
        self._tb = None
        self._trackers: list[tuple[str, Any]] = []
        self._failed: set[str] = set()  # trackers whose log() raised: not asked again
        if not self.enabled:
            return
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is a dependency; a stripped environment still gets the JSON lines
            LOG.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
        if loggers:
            from . import trackers

            self._trackers = list(zip(loggers, trackers.open_trackers(loggers, run_dir=run_dir, config=config or {}),
                                      strict=True))  # fmt: skip

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        scalars = {f"{kind}/{key}": value for key, value in _flatten(values).items()
                   if isinstance(value, int | float) and math.isfinite(value)}  # fmt: skip
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        for name, tracker in self._trackers if scalars else ():  # a record without numbers (a resume) is jsonl only
            if name in self._failed:
                continue
            try:
                tracker.log(scalars, step)
            except Exception as e:  # a dashboard that is down must not stop training: metrics.jsonl has everything
                LOG.warning(f"train.loggers: {name} failed at step {step} ({type(e).__name__}: {e}); it gets no "
                            "more metrics in this run, metrics.jsonl and TensorBoard go on")  # fmt: skip
                self._failed.add(name)

    def resumed(self, step: int, values: dict[str, Any]) -> None:
        """Mark a resume at `step`: a "resume" line, and TensorBoard drops what an earlier attempt logged after
        `step` (those steps are about to be logged again), so its curves do not double back."""
        if not self.enabled:
            return
        self.write("resume", step, values)
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = SummaryWriter(log_dir, purge_step=step + 1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        for name, tracker in self._trackers:
            try:
                tracker.close()
            except Exception as e:
                LOG.warning(f"train.loggers: {name} failed to finish its run ({type(e).__name__}: {e})")
        self._trackers = []


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, list | tuple):
            for i, item in enumerate(v):
                out.update(_flatten(item, f"{key}/{i}/") if isinstance(item, dict) else {f"{key}/{i}": item})
        else:
            out[key] = v
    return out


class Progress:
    """Steps, rate and ETA on rank 0: a tqdm bar on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, start: int, every: int) -> None:
        self.total, self.every = total, every
        self.enabled = dist.is_main()
        self.bar = None
        self.t0, self.s0 = time.monotonic(), start
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, info: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.s0) / max(time.monotonic() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            fields = " ".join(f"{k}={v:.4g}" for k, v in info.items())
            LOG.info(f"step {step}/{self.total} ({rate:.2f} step/s, eta {format_duration(eta)}) {fields}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def all_reduce_bn_stats(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics across ranks (each rank's drift apart; rank 0's would be saved)."""
    if not dist.is_initialized() or dist.world_size() == 1:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
                    buf /= dist.world_size()


class Trainer:
    """Runs the loop for one recipe; built by `video_ens.train`, which owns every component."""

    def __init__(
        self,
        *,
        recipe,
        run_dir: Path,
        engine,
        criterion,
        train_data,
        eval_data,
        device: torch.device,
        metrics_task: str,
        flops_per_sample: float | None = None,
    ) -> None:
        self.recipe, self.run_dir, self.engine, self.criterion = recipe, Path(run_dir), engine, criterion
        self.train_data, self.eval_data, self.device = train_data, eval_data, device
        self.metrics_task = metrics_task
        self.flops_per_sample = flops_per_sample
        t = recipe.train
        self.global_batch = t.global_batch_size
        self.accum = engine.gradient_accumulation_steps()
        if train_data.micro_batches_per_epoch < self.accum:
            raise RecipeError(
                f"an epoch has {train_data.micro_batches_per_epoch} micro-batches per rank, fewer than "
                f"the {self.accum} accumulation steps of one optimizer step: raise data.samples_per_epoch or lower "
                "train.global_batch_size"
            )
        self.steps_per_epoch = train_data.micro_batches_per_epoch // self.accum
        # The samples an epoch trains on, for the schedule: whole optimizer steps only. floor(floor(N / (micro x
        # world)) / accum) = floor(N / global batch), so steps and samples per epoch, and with them the learning
        # rate at every step, are the same at every world size (counting per-rank micro-batches, 60 samples gave
        # 60 on 2 ranks and 56 on 4 with micro-batches of 2, which moved the warm-up and the cosine).
        self.samples_per_epoch = self.steps_per_epoch * self.global_batch
        total = int(round(t.epochs * self.steps_per_epoch))
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        self._running_stats = [
            buf
            for m in engine.module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]
        self.step = 0  # optimizer steps done
        self.bad_in_a_row = 0
        self._stop_signal: str | None = None  # set by the signal handler; acted on at a step boundary
        # An evaluation that was due at the step a stop signal ended on: skipped then (the scheduler's grace is for
        # the checkpoint), carried in the checkpoint and run first thing after the resume.
        self._eval_pending = False
        self.log = MetricsLog(self.run_dir, loggers=t.loggers, config=recipe_to_dict(recipe))

    # ------------------------------------------------------------------ state carried in checkpoints
    def client_state(self) -> dict:
        return {
            "step": self.step,
            "recipe": self.recipe_dict(),
            "bad_in_a_row": self.bad_in_a_row,
            "world_size": dist.world_size(),
            "eval_pending": self._eval_pending,
        }

    def recipe_dict(self) -> dict:
        from .config import recipe_to_dict

        return recipe_to_dict(self.recipe)

    def restore(self, client_state: dict) -> None:
        self.step = int(client_state["step"])
        self.bad_in_a_row = int(client_state.get("bad_in_a_row", 0))
        self._eval_pending = bool(client_state.get("eval_pending", False))
        changes = resume_changes(client_state, self.recipe_dict(), dist.world_size())
        if changes:
            LOG.warning(
                f"resuming at step {self.step} with a setup that differs from the checkpoint's: {'; '.join(changes)}. "
                "Training goes on, but the rest of the run is not the one an uninterrupted run would have had "
                "(the data order depends on data.num_workers, the world size, the batch and the seeds); "
                "resume with the original values to continue exactly"
            )
        # the layout this resume runs with: at another world size the global batch stays, micro x accum x ranks
        layout = {
            "world_size": dist.world_size(),
            "micro_batch_size": self.engine.train_micro_batch_size_per_gpu(),
            "grad_accum_steps": self.accum,
        }
        self.log.resumed(self.step, {"changed": changes, "batch": layout})

    # ------------------------------------------------------------------ the loop
    def fit(self, *, save_fn, on_step_end=None) -> None:
        """Train from `self.step` to `total_steps`; `save_fn(trainer)` writes a checkpoint (the engine's job)."""
        t = self.recipe.train
        progress = Progress(self.total_steps, self.step, t.log_every)
        window_t0, window_samples = time.monotonic(), 0
        window_wait = self._data_wait()
        stream = self._micro_batches()
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        try:
            if self._eval_pending and self.step < self.total_steps:
                self.evaluate()  # the one a stop skipped at this step (the final step evaluates anyway)
            self._eval_pending = False
            while self.step < self.total_steps:
                lr = lr_at(
                    self.recipe.optim,
                    samples_seen=self.step * self.global_batch,
                    total_samples=self.total_steps * self.global_batch,
                    samples_per_epoch=self.samples_per_epoch,
                    global_batch_size=self.global_batch,
                )
                set_lr(self.engine.optimizer, lr)
                # Dropout and any other in-model randomness draw from the global generator: reseeding it from
                # (seed, rank, step) makes every step's randomness independent of history, so a resumed run
                # repeats exactly what an uninterrupted one does without saving generator states per rank.
                torch.manual_seed(_step_seed(t.seed, dist.rank(), self.step))
                terms, stop = self._train_step(stream)
                self.step += 1
                window_samples += self.global_batch
                info = {"loss": terms["loss"], "lr": lr}
                progress.update(self.step, info)
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    dt = max(time.monotonic() - window_t0, 1e-9)
                    rate = window_samples / dt
                    wait = self._data_wait()
                    # The share of the window this rank spent waiting for its data workers: near 0 when the input
                    # pipeline keeps up, near 1 when the run is bound by it (add data.num_workers or cores).
                    record = {
                        **terms,
                        "lr": lr,
                        "samples_per_s": rate,
                        "epoch": self.step / self.steps_per_epoch,
                        "data_wait": round(min(1.0, (wait - window_wait) / dt), 4),
                        "bad_samples": gather_bad_samples(self.train_data.stats),
                    }  # every rank's
                    if self.flops_per_sample and self.device.type == "cuda":
                        # forward + backward ~ 3x the forward FLOPs, per GPU
                        record["tflops_per_gpu"] = 3 * self.flops_per_sample * rate / dist.world_size() / 1e12
                    self.log.write("train", self.step, record)
                    window_t0, window_samples, window_wait = time.monotonic(), 0, wait
                last = self.step == self.total_steps
                if t.eval_every and self.step % t.eval_every == 0 and not last:
                    if stop:
                        self._eval_pending = True  # after the resume: a full evaluation could outlast the grace
                    else:
                        self.evaluate()
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or last or stop:
                    save_fn(self)
                if on_step_end is not None:
                    on_step_end(self)
                if stop and not last:
                    signame = self._stop_signal or "a stop signal (on another rank)"
                    self.log.write("stop", self.step, {"signal": signame})
                    LOG.warning(f"{signame}: stopping after step {self.step}, checkpointed; relaunch to resume")
                    raise StopRequested(self.step, signame)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.close()

    def _data_wait(self) -> float:
        """Seconds this rank has waited for training batches so far (0 for a stream that does not count them)."""
        return float(getattr(self.train_data, "stats", {}).get("seconds", {}).get("wait", 0.0))

    def _on_stop_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, and every rank stops after the same step (see _agree).
        self._stop_signal = signal.Signals(signum).name

    def _micro_batches(self):
        """Micro-batches from the exact position `self.step` implies, across epoch boundaries."""
        per_epoch = self.steps_per_epoch * self.accum
        epoch, start = divmod(self.step * self.accum, per_epoch)
        while True:
            n = 0
            for batch in self.train_data.batches(epoch, start):
                yield batch
                n += 1
                if start + n >= per_epoch:
                    break
            epoch, start = epoch + 1, 0

    def _train_step(self, stream) -> tuple[dict[str, Any], bool]:
        """One optimizer step = `accum` micro-batches; returns the mean loss terms over them, and whether the ranks
        agreed to stop after this step (a stop signal arrived on one of them)."""
        self.engine.train()
        sums: dict[str, torch.Tensor] = {}
        skipped = 0
        for i in range(self.accum):
            batch = next(stream)
            inputs = to_model_input(batch, self.device)  # clips: resized, flipped, jittered, normalised here
            target = batch["target"].to(self.device, non_blocking=True)
            kwargs = {"lengths": batch["lengths"].to(self.device)} if "lengths" in batch else {}
            saved = [b.clone() for b in self._running_stats]  # BN statistics: a few K floats, restored if bad
            out = self.engine(inputs, **kwargs)  # 1. forward (autocast per the DeepSpeed config)
            terms = self.criterion(out.branches, target)
            loss = terms["loss"]
            finite, stop = self._agree(loss)
            if not finite:
                # every rank sees the same verdict, so all skip this backward together (no collective mismatch)
                # A zero loss that still touches every parameter keeps ZeRO's gradient hooks in step; its gradient
                # is exactly zero, so nothing non-finite reaches the weights.
                skipped += 1
                loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters() if p.requires_grad)
                with torch.no_grad():  # the bad forward also moved BN running statistics: undo that
                    for buf, old in zip(self._running_stats, saved, strict=True):
                        buf.copy_(old)
            whole_step_bad = skipped == self.accum and i == self.accum - 1
            if whole_step_bad:
                # With every micro-batch skipped the gradient is zero, but momentum and weight decay would still
                # move the weights. A learning rate of 0 for this one update leaves them (and the fp32 master
                # copy) bit for bit unchanged; fit() sets the scheduled rate again before the next step. The
                # optimizer's moments still decay by one step, which is the only trace the bad step leaves.
                set_lr(self.engine.optimizer, 0.0)
            self.engine.backward(loss)  # 2. backward
            self.engine.step()  # 3. optimizer step at the accumulation boundary (DeepSpeed counts micro-steps)
            for k in ("loss", "ensemble", "branch", "ensemble_truth", "branch_truth"):
                sums[k] = sums.get(k, 0.0) + terms[k].detach().float()
        if skipped:
            self.bad_in_a_row += 1
            # numbered like the "train" line of the same update (self.step counts the updates done before it)
            self.log.write("skip", self.step + 1, {"reason": "non-finite loss", "micro_batches": skipped})
            LOG.warning(f"step {self.step + 1}: {skipped} micro-batch(es) with a non-finite loss were not applied")
            if self.bad_in_a_row >= self.recipe.train.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_in_a_row} steps in a row had a non-finite loss (train.max_bad_steps = "
                    f"{self.recipe.train.max_bad_steps}): lower optim.lr or check the data"
                )
        else:
            self.bad_in_a_row = 0
        n = sums["branch"].numel()
        vec = torch.cat(
            [
                sums["loss"].reshape(1),
                sums["ensemble"].reshape(1),
                sums["branch"].reshape(-1),
                sums["ensemble_truth"].reshape(1),
                sums["branch_truth"].reshape(-1),
            ]
        )
        vec = vec / self.accum
        if dist.is_initialized():
            tdist.all_reduce(vec, op=tdist.ReduceOp.SUM)
            vec /= dist.world_size()
        vec = vec.tolist()
        terms = {
            "loss": vec[0],
            "ensemble": vec[1],
            "branch": vec[2 : 2 + n],
            "ensemble_truth": vec[2 + n],
            "branch_truth": vec[3 + n :],
        }
        return terms, stop

    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(the loss is finite on every rank, some rank has a stop signal), in one small all-reduce per
        micro-batch, so every rank skips the same steps and stops after the same one."""
        stop_here = self._stop_signal is not None
        flags = torch.stack(
            [torch.isfinite(loss.detach()).float().reshape(()), torch.tensor(float(not stop_here), device=loss.device)]
        )
        if dist.is_initialized():
            tdist.all_reduce(flags, op=tdist.ReduceOp.MIN)
        return bool(flags[0].item() == 1.0), bool(flags[1].item() == 0.0)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Every metric per branch and for the ensemble, over every evaluation sample once across ranks."""
        if self.eval_data is None:
            return {}
        all_reduce_bn_stats(self.engine.module)
        result = evaluate(
            self.engine.module,
            self.eval_data,
            task=self.metrics_task,
            top_k=self.recipe.eval.top_k,
            device=self.device,
            precision=self.recipe.train.precision,
            log_every=0,
        )
        self.log.write("eval", self.step, result)
        if dist.is_main():
            ens = ", ".join(f"{k}={v:.4f}" for k, v in result["ensemble"].items())
            LOG.info(f"eval at step {self.step} on {result['num_samples']} samples: ensemble {ens}")
        return result


def resume_changes(client_state: dict, recipe: dict, world_size: int) -> list[str]:
    """What differs between the run a checkpoint was written by and this one: "field: old -> new" for every
    recipe field (dotted) and for the world size. `description` and the run-length fields (epochs, max_steps,
    checkpoint/eval/log cadence) are not reported: extending or re-pacing a run is what a resume is for; nor are
    train.resume, the timeouts and the trackers, which change nothing a run computes (config.RESUME_UNREPORTED)."""
    changes = []
    if client_state.get("recipe") is not None:
        old, new = flatten_recipe(client_state["recipe"]), flatten_recipe(recipe)
        changes = [
            f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
            for k in sorted(old.keys() | new.keys())
            if k not in RESUME_UNREPORTED and old.get(k) != new.get(k)
        ]
    saved_world = client_state.get("world_size")
    if saved_world is not None and int(saved_world) != world_size:
        changes.append(f"world size: {saved_world} -> {world_size}")
    return changes


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for one (seed, rank, step), mixed so that neighbouring steps or ranks get unrelated streams."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
