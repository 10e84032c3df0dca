"""The training loop: one program for a laptop, `torchrun`, `srun` and `mpiexec`.

    dmhpc train --config configs/deepmerge-mmd-fisher-entropy.yaml train.epochs=5
    torchrun --nproc_per_node=4 -m dmhpc.train --config ... --resume auto

Read top to bottom: claim the run directory, refuse at start what would fail later, build the
loader and the training state, resume, then the epoch loop (step, log, evaluate, select,
checkpoint) and the test of the selected checkpoint. The parts live in their own modules:
RunDir (dmhpc/run.py), the start-up checks (preflight.py), TrainState (state.py), TrainStep
(step.py), EpochMeter (meter.py), evaluation (evaluate.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch

from dmhpc.config import config_to_dict, load_config
from dmhpc.data.loaders import ORDER, make_train_loader
from dmhpc.distributed import (agree, agreed, all_gather_object, bootstrap, meet_before_leaving, on_main, shutdown,
                               synchronize)
from dmhpc.errors import DmhpcError
from dmhpc.losses.collective import stable_rows
from dmhpc.names import DIVERGED
from dmhpc.progress import progress_bar
from dmhpc.run import RunDir, check_end_evaluated, check_epochs, check_patience, check_steps
from dmhpc.train import preflight
from dmhpc.train.checkpoint import (REQUEUE_EXIT_CODE, UNFIT, StopRequest, check_requeue_progress, check_selected,
                                   load_checkpoint, load_checkpoint_sha256, load_weights, save_checkpoint, unfit)
from dmhpc.train.evaluate import evaluate_run, format_table, predict
from dmhpc.train.meter import Diverged, EpochMeter
from dmhpc.train.metrics import DEV_MAX_ROWS, MetricLog, domain_metrics, selection_score, validator_scores
from dmhpc.train.objective import fisher_scale_note
from dmhpc.train.state import TrainState
from dmhpc.train.step import TrainStep, determinism

DEBUG_BATCHES = 8  # debug=true trains on this many global batches per domain


def train(cfg, resume: str = "auto", overwrite: bool = False) -> int:
    """Train as configured; returns the process exit code (0, or REQUEUE_EXIT_CODE on a signal)."""
    with _process_settings(cfg):
        dist = bootstrap()
        run = RunDir(cfg.run.dir)
        # Caught from the start, not only in the epoch loop: a stop signal during the start-up checks
        # (checksums, the wait for a lock) or the final test killed the trainer by its default action
        # (exit 143, no line), which launchers took for a failure, not a requeue. Caught there, it
        # stops the loop after its first step or two (checkpoint, requeue code) or lets the test finish. Caught
        # to the end, through the teardown: srun's --kill-on-bad-exit sends SIGTERM to the ranks still
        # leaving the process group when the first exits with the requeue code.
        with StopRequest(cfg.train.signals) as stop:
            try:
                code = _train(cfg, resume, overwrite, dist, run, stop)
                meet_before_leaving()  # rank 0 printed its last line (a requeue's) before any rank exits
                return code
            except Exception as exc:
                if agreed(exc):  # every rank holds it, at the same point: all print it before any exits
                    meet_before_leaving()
                raise
            finally:
                run.release()
                try:
                    stop.settle()  # no poll of it in flight when the group goes
                finally:
                    shutdown()


@contextlib.contextmanager
def _process_settings(cfg):
    """The run's process-wide settings (deterministic kernels, debug's anomaly detection, the thread
    count), undone when it ends: an in-process run (a tune trial, a notebook) left them to whatever
    ran next in the process, such as a predict on deterministic kernels or checking every op."""
    threads = torch.get_num_threads()
    # debug=true: autograd names the op that made a NaN.
    anomaly = torch.autograd.detect_anomaly() if cfg.debug else contextlib.nullcontext()
    try:
        with determinism(cfg.train.deterministic), anomaly:
            yield
    finally:
        torch.set_num_threads(threads)


def _train(cfg, resume: str, overwrite: bool, dist, run: RunDir, stop: StopRequest) -> int:
    # --- claim the run directory and check everything before anything is written ------------------
    manifests = preflight.load_manifests(cfg)
    data_ids = preflight.data_identity(cfg, manifests)
    claim = on_main(lambda: run.claim(cfg, resume, overwrite, {f"data.{k}": v["fingerprint"]
                                                               for k, v in data_ids.items()}, dist.attempt,
                                      stopped=lambda: stop.signal_name))
    preflight.check_data(cfg, manifests, dist)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank; data order comes from the loader
    # Agreed: out of GPU memory on one rank alone left the others in the next collective.
    state = agree(lambda: TrainState.build(cfg, dist.device, manifests["source"]["shape"][0]))
    rows = cfg.train.batch_size * (2 if state.model.reads_target else 1)  # of a training forward pass
    agree(lambda: preflight.check_model_input(cfg, state.model.backbone, manifests["source"]["shape"], dist.device,
                                              rows))
    last = run.checkpoint("last")

    def started() -> list[int] | None:
        """This job's attempts that started the run (read only where there were earlier ones)."""
        if not dist.attempt or dist.attempt["restart"] == 0:
            return []
        try:
            return run.started_attempts(dist.attempt["job"])
        except DmhpcError:  # a run.json edited by hand: replaced with a run that trained nothing yet
            if not claim.replaces:
                raise
            return []

    if claim.resume_from is not None:
        def resume() -> None:
            saved = load_checkpoint(claim.resume_from)
            if claim.resume_from.resolve() == last.resolve():  # (--resume RUN/last.pt spelt otherwise too)
                check_requeue_progress(last, saved, dist.attempt, started())
            elif not last.is_file():  # (--resume PATH elsewhere, taken again by each attempt that saved none)
                check_requeue_progress(last, None, dist.attempt, started())
            if claim.own and not state.model.reads_target and "forward" not in saved:
                raise DmhpcError(f"{claim.resume_from}: a run without adaptation begun by an older dmhpc, whose steps "
                                 f"passed the target batch through BatchNorm too (docs/training.md, \"What a step "
                                 f"does\"); resumed, it would train on another way: start it anew (--resume none)")
            try:
                state.load_state_dict(saved, dist.rank)
            except UNFIT as exc:
                raise unfit(claim.resume_from, exc) from None

        agree(resume)
    else:
        # Whatever --resume says: the job's arguments begin the run again in each attempt until one
        # writes a last.pt (--resume none --overwrite too), and one that never did requeued for ever.
        agree(lambda: None if last.is_file() else check_requeue_progress(last, None, dist.attempt, started()))
    prog = state.progress
    if claim.resume_from is not None and not claim.own:
        # A new run from another's checkpoint selects among its own epochs: the other run's best
        # score, never beaten, would leave this one without a best.pt to test.
        prog.best_score, prog.evals_since_best, prog.longest_without_best = float("-inf"), 0, 0
    kind = preflight.loader_kind(cfg, prog, dist.world_size)

    # --- data, the run's length, and only then the run's files ------------------------------------
    if cfg.debug and claim.own and prog.world_size and prog.world_size != dist.world_size:
        # Its rows are DEBUG_BATCHES global batches of its world: another world trains on other rows.
        raise DmhpcError(f"world size {dist.world_size}: debug=true trained this run on {DEBUG_BATCHES} global "
                         f"batches of {prog.world_size} ranks; resume it with {prog.world_size} ranks, or start it "
                         f"anew (--resume none --overwrite)")
    subset = DEBUG_BATCHES * cfg.train.batch_size * dist.world_size if cfg.debug else None
    t_setup = time.perf_counter()
    loader = make_train_loader(
        kind, cfg.data.source, cfg.data.target, batch_size=cfg.train.batch_size,
        rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, device=dist.device,
        augment=cfg.data.augment, normalize=cfg.data.normalize, num_workers=cfg.data.num_workers,
        subset=subset, stop_signals=cfg.train.signals, channels_last=cfg.train.channels_last,
        local_ranks=dist.local_world_size, cpus=dist.cpus, read_target=state.model.reads_target)

    def early_stopped() -> bool:  # also on resume: a run that stopped early is not trained on
        return bool(cfg.train.early_stopping) and prog.evals_since_best >= cfg.train.early_stopping

    def at() -> int:
        """Where the run is in this world's steps: what the schedules and the run's length count.
        prog.step counts the steps taken, in the steps of each world size the run had; after a world
        size changed at an epoch's end, it would end the run epochs early (more ranks) or late."""
        return prog.epoch * steps_per_epoch + prog.step_in_epoch

    try:
        if prog.loader and ORDER[loader.kind] != ORDER.get(prog.loader):  # (another kind at an epoch's start)
            loader.reason += (f"; the rows' order changes here (the run's epochs so far were read by {prog.loader}): "
                              f"not bit-identical to an uninterrupted run")
        # A checkpoint of dmhpc before the world size was recorded (0) may count its epoch's steps in
        # another world's; one that recorded this world's counts them in these.
        same_world = prog.world_size == dist.world_size
        prog.world_size, prog.loader = dist.world_size, loader.kind
        # The slowest rank's data staging time, which scaling studies report beside the throughput.
        loader_setup_s = max(all_gather_object(time.perf_counter() - t_setup))
        steps_per_epoch = len(loader)
        prog.schedule_steps_per_epoch = prog.schedule_steps_per_epoch or steps_per_epoch
        if same_world and prog.step_in_epoch > steps_per_epoch:  # the same rows as when it was written
            raise DmhpcError(f"{claim.resume_from}: progress.step_in_epoch {prog.step_in_epoch} is past the "
                             f"{steps_per_epoch} steps of an epoch of this run")
        if prog.step_in_epoch >= steps_per_epoch:
            # A best.pt written before its epoch rolled over (dmhpc before 2026-12-01): that epoch is done.
            prog.epoch, prog.step_in_epoch = prog.epoch + 1, 0
        total_steps = cfg.train.epochs * steps_per_epoch
        if cfg.train.max_steps:
            total_steps = min(total_steps, cfg.train.max_steps)
        _check_length(cfg, prog, at(), total_steps, None if claim.own else claim.resume_from)
        _check_warmup(cfg.optim, total_steps * prog.schedule_steps_per_epoch / steps_per_epoch)
        # A run that stopped early is finished too: entered again (a requeued script that trains runs
        # in turn), it writes no checkpoint, and counted among the attempts that started it, two such
        # entries refused the job as one whose stops saved nothing.
        finished = bool(claim.own and prog.step and (at() >= total_steps or early_stopped()))
        if finished and at() >= total_steps:
            by_steps = bool(cfg.train.max_steps) and total_steps == cfg.train.max_steps
            check_end_evaluated(f"train.max_steps {cfg.train.max_steps}" if by_steps else f"train.epochs {cfg.train.epochs}",
                                prog.step, on_main(lambda: run.evaluated_at(prog.step)))
        # The selected checkpoint is tested at the run's end: missing, cut short or of another
        # moment, it failed the run after the whole resumed training (and again at every rerun).
        selected = (lambda: _check_best(run, prog.best_score)) if claim.own and math.isfinite(prog.best_score) \
            else None
        cleaned = on_main(lambda: run.start(cfg, claim, data_ids, prog.step, trains=not finished, check=selected))
        step = TrainStep(cfg, state, dist, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                         schedule_steps_per_epoch=prog.schedule_steps_per_epoch)
    except BaseException:
        loader.close()  # its workers and pipelines end with the refused start
        raise
    dirs, stats = {"source": cfg.data.source, "target": cfg.data.target}, loader.stats
    # The images a step reads, all ranks': a run without a term that reads the target reads the source's alone.
    images_per_step = (2 if state.model.reads_target else 1) * cfg.train.batch_size * dist.world_size
    prints = {d: data_ids[d]["fingerprint"] for d in dirs}  # what each data set was at the start

    # TensorBoard hides events at or after purge_step; the log keeps the records of the step resumed from.
    purge_step = prog.step + 1 if claim.resume_from is not None else None
    log = None

    def open_log() -> None:  # rank 0's; its error (a full disk) reaches every rank
        nonlocal log
        log = MetricLog(run, purge_step=purge_step)

    def announce() -> None:  # rank 0's; its error (a full disk) reaches every rank
        print(f"dmhpc train: {run.path} | world {dist.world_size} on {dist.device} | loader {loader.description} "
              f"| {steps_per_epoch} steps/epoch, {total_steps} steps", flush=True)
        for note in (fisher_scale_note(cfg.loss, dist.world_size), preflight.data_note(cfg, manifests)):
            if note is not None:
                print(f"dmhpc train: note: {note}", flush=True)
        if claim.note is not None:
            print(f"dmhpc train: note: {claim.note}", flush=True)
        if claim.resume_from is not None:
            changed = "".join(f"; {k} {v[0]} -> {v[1]}" for k, v in claim.changed.items())
            print(f"dmhpc train: resumed from {claim.resume_from} at epoch {prog.epoch}, step {prog.step}{changed}",
                  flush=True)
            if early_stopped() and at() < total_steps:
                # A longer run asked of one that stopped early trained nothing, and said nothing of why.
                print(f"dmhpc train: note: the run stopped early ({cfg.select.criterion} did not improve for "
                      f"{prog.evals_since_best} evaluations, train.early_stopping {cfg.train.early_stopping}); it "
                      f"stays stopped and tests its selection: raise train.early_stopping to train on", flush=True)
        log.write({"kind": "setup", "step": prog.step, "world_size": dist.world_size, "loader": loader.kind,
                   "loader_setup_s": loader_setup_s, "cpu_threads": torch.get_num_threads(), "cpus": dist.cpus,
                   "resumed_from": str(claim.resume_from) if claim.resume_from else None,
                   "changed": claim.changed, **cleaned}, prog.step)

    try:
        on_main(open_log)
        on_main(announce)
    except BaseException:  # (a full disk): the loader's resident data and workers went on being held
        loader.close()
        if log is not None:
            log.close()
        raise

    def checkpoint(name: str, meter: EpochMeter, selection: dict | None = None, epoch_done: bool = False) -> None:
        meter.check_finite(state, dist, prog.step)  # never write a diverged state
        if not meter.watch_loss:  # (fp16: the job's streak, the same on every rank once checked)
            prog.fp16_streaks = [meter.streak]
        content = state.state_dict()  # a collective: every rank calls it
        # The data sets and statistics of the weights, in the file with them (see RunDir.trained_data).
        content.update(selection=selection or {}, config=config_to_dict(cfg), data=data_ids, attempt=dist.attempt)
        if epoch_done:  # written before the epoch rolls over; resumed from, it starts the next epoch
            content.update(epoch=prog.epoch + 1, progress={**content["progress"], "epoch": prog.epoch + 1,
                                                           "step_in_epoch": 0})
        # Every rank waits for rank 0's write (nobody exits, ending the job step, while it writes)
        # and gets its error (a full disk) as its own one line, not a broken collective later.
        def write() -> None:  # a best waits for its epoch's last.pt (see RunDir.promote_best)
            path = run.next_best if name == "best" else run.checkpoint(name)
            save_checkpoint(path, {**content, "run_id": run.run_id})

        on_main(write)

    def log_step(terms: dict, bar) -> None:  # rank 0's; its error (a full disk) reaches every rank
        losses = {k: float(v) for k, v in terms.items()}
        log.write({"kind": "step", "step": prog.step, "epoch": prog.epoch, "lr_scale": step.lr_scale(at() - 1),
                   "grl": step.grl(at() - 1), "loss": losses}, prog.step)
        if not bar.disable:  # on a terminal: the images/s of the whole job, and the loss
            rate = bar.format_dict["rate"] or 0.0
            # drawn now, once per log_every steps: a short epoch may end before tqdm's next redraw
            bar.set_postfix(loss=f"{losses['total']:.4g}",
                            img_s=f"{rate * images_per_step:.0f}")

    # --- the epoch loop -----------------------------------------------------------------------------
    criterion, stopped = cfg.select.criterion, False
    feature_rows = DEV_MAX_ROWS if criterion == "dev" or cfg.select.all_validators else 0

    def resumed_streak() -> int | None:
        """The fp16 streak as checkpointed: every rank's is the job's (EpochMeter.streak); of a
        checkpoint that held each rank's own, the longest."""
        streaks = prog.fp16_streaks
        return max(streaks) if cfg.train.amp == "fp16" and streaks else None

    meter = None
    try:
        # The batches' row counts never change: the global-scope losses exchange them once.
        with stable_rows():
            while not stopped and at() < total_steps and prog.epoch < cfg.train.epochs and not early_stopped():
                state.model.train()
                meter = EpochMeter(dist.device, watch_loss=cfg.train.amp != "fp16",
                                   streak=meter.streak if meter is not None else resumed_streak())
                t_epoch = time.perf_counter()
                bar = progress_bar(steps_per_epoch - prog.step_in_epoch, f"epoch {prog.epoch}", show=dist.is_main)
                at_end = False  # the epoch's (or the run's) last step is done
                for batch in loader.epoch(prog.epoch, start_step=prog.step_in_epoch):
                    try:
                        terms, outputs = step(at(), batch)
                    except RuntimeError as exc:  # debug's anomaly detection meets the first NaN in backward
                        if not (cfg.debug and "returned nan values" in str(exc)):
                            raise
                        raise Diverged(f"step {prog.step + 1}: {str(exc).splitlines()[0]} (debug=true's anomaly "
                                       f"detection); training stopped without writing it (lower optim.lr or set "
                                       f"optim.grad_clip; the last good checkpoint is kept)", agreed=False) from None
                    prog.step += 1
                    prog.step_in_epoch += 1
                    meter.add(prog.step, terms, outputs, batch[1], batch[3])
                    bar.update(1)
                    if prog.step % cfg.train.log_every == 0:
                        meter.check_finite(state, dist, prog.step)
                        on_main(lambda: log_step(terms, bar))
                    at_end = at() >= total_steps or prog.step_in_epoch >= steps_per_epoch
                    if stop.should_stop():  # the same answer on every rank, so all stop after this step
                        stopped = True
                        if not at_end:
                            break
                        # At an epoch's end the epoch is finished first (evaluated, selected, logged):
                        # the resumed run would start the next one and never evaluate this one.
                    elif cfg.train.checkpoint_every and prog.step % cfg.train.checkpoint_every == 0 and not at_end:
                        # (at the end, the epoch's own checkpoint follows its record: one that came
                        # before it would resume into an epoch with no step left, logged twice)
                        checkpoint("last", meter)
                    if at() >= total_steps:
                        break
                bar.close()
                if stopped and not at_end:
                    checkpoint("last", meter)
                    break

                # --- epoch record, evaluation, selection, checkpoint --------------------------------
                synchronize(dist.device)  # the epoch's time includes its last queued kernels
                elapsed = time.perf_counter() - t_epoch
                meter.check_finite(state, dist, prog.step)
                # "steps": what the train loss and metrics average over; fewer than the epoch's after
                # a resume in its middle (the steps before the stop are in no record).
                record = {"kind": "epoch", "epoch": prog.epoch, "step": prog.step, "steps": meter.steps,
                          **meter.summary(dist),
                          "lr": cfg.optim.lr * step.lr_scale(at() - 1), "grl": step.grl(at() - 1),
                          "images_per_s": meter.steps * images_per_step / max(elapsed, 1e-9),
                          "step_time_s": elapsed / max(meter.steps, 1)}
                epoch_done = prog.step_in_epoch >= steps_per_epoch
                if at() >= total_steps or (epoch_done and (prog.epoch + 1) % cfg.train.eval_every == 0):
                    val = {d: predict(state.model.backbone, dirs[d], "val", batch_size=2 * cfg.train.batch_size,
                                      dist=dist, mean=stats[d][0], std=stats[d][1], feature_rows=feature_rows,
                                      expected=prints[d])
                           for d in dirs}
                    for d in dirs:
                        record[d]["val"] = domain_metrics(val[d]["labels"], val[d]["prob"])
                    # Rank 0's score for all: a rank that scored a near-tie the other way (DEV's BLAS
                    # sums differ with the thread count) alone went into best's collectives and hung.
                    score = on_main(lambda: selection_score(criterion, val))
                    if not math.isfinite(score):  # never > best: the run would end without a best.pt
                        raise Diverged(f"select.criterion {criterion}: its score is {score} at epoch {prog.epoch} "
                                         f"(on the validation splits); no checkpoint can be chosen by it")
                    record["selection"] = {"criterion": criterion, "score": score}
                    if cfg.select.all_validators:  # for the study's validator table; chooses nothing
                        record["validators"] = on_main(lambda: validator_scores(val))
                        test = predict(state.model.backbone, dirs["target"], "test", dist=dist,
                                       batch_size=2 * cfg.train.batch_size, mean=stats["target"][0],
                                       std=stats["target"][1], expected=prints["target"])
                        record["target"]["test"] = domain_metrics(test["labels"], test["prob"])
                    if score > prog.best_score:
                        prog.longest_without_best = max(prog.longest_without_best, prog.evals_since_best)
                        prog.best_score, prog.evals_since_best = score, 0
                        checkpoint("best", meter, {"criterion": criterion, "score": score, "epoch": prog.epoch},
                                   epoch_done=epoch_done)
                    else:
                        prog.evals_since_best += 1
                if at() >= total_steps or early_stopped():
                    # Training ends here; the selected checkpoint's test follows. A tuner reading the
                    # log prunes no trial in that test.
                    record["last"] = True
                if epoch_done:
                    prog.epoch, prog.step_in_epoch = prog.epoch + 1, 0
                # The record first: a kill between the two loses it with the epoch (the resume drops
                # records after its checkpoint and does the epoch again), never alone.
                def write_record() -> None:  # rank 0's; its error reaches every rank
                    log.write(record, prog.step)
                    print(_epoch_line(record, criterion), flush=True)

                on_main(write_record)
                checkpoint("last", meter)
                on_main(run.promote_best)
                if not stopped and stop.poll_now():
                    # A signal during the evaluation: stopped at this checkpoint. The next epoch's
                    # loader start and first steps came out of the scheduler's grace time; after the
                    # last epoch the final test would (the whole test split, t-SNE) and run into the
                    # time limit, which ends a job unrequeued. The next attempt, finished, tests.
                    stopped = True
                if early_stopped() and dist.is_main:
                    print(f"dmhpc train: early stop: {criterion} has not improved for "
                          f"{prog.evals_since_best} evaluations", flush=True)
    except Diverged as exc:
        # Said in the log too: a tuner ranks the trial's values as bad, where a failed setup (a data
        # path) is no fault of the values. A resume drops it with the records after its checkpoint.
        record = {"kind": DIVERGED, "step": prog.step, "error": str(exc)}
        with contextlib.suppress(DmhpcError):
            if exc.agreed:
                on_main(lambda: log.write(record, prog.step))
            elif dist.is_main:  # (no collective: the other ranks are not here)
                log.write(record, prog.step)
        raise
    finally:
        try:
            stop.settle()  # raises when a peer is gone: the loader and log are closed all the same
        finally:
            loader.close()  # its worker processes end with the loop, whatever ended it
            if log is not None:
                log.close()
    if stopped:
        if dist.is_main:
            print(f"dmhpc train: {stop.signal_name or 'a signal on another rank'}: checkpoint written at step "
                  f"{prog.step}; exiting with {REQUEUE_EXIT_CODE} so the launcher requeues", flush=True)
        return REQUEUE_EXIT_CODE

    # --- test the selected checkpoint ---------------------------------------------------------------
    best, sha256 = load_checkpoint_sha256(run.checkpoint("best"))
    check_selected(best, prog.best_score, run.checkpoint("best"))
    load_weights(state.model.backbone, best, run.checkpoint("best"))
    info = {"name": "best", "epoch": best["epoch"], "step": best["step"], **best["selection"], "sha256": sha256}
    result = evaluate_run(state.model.backbone, cfg, dist, run, checkpoint=info, split="test", stats=stats,
                          final=True, expected=prints)
    def report() -> None:  # rank 0's; its error (a full disk at TensorBoard's events) reaches every rank
        print(format_table({run.label: result}), flush=True)
        with MetricLog(run, purge_step=None) as tb:
            tb.hparams(cfg, info, result)
        if stop.signal_name is not None:
            print(f"dmhpc train: {stop.signal_name} after the last step: the run finished its test first", flush=True)

    on_main(report)
    return 0


def _check_best(run: RunDir, best_score: float) -> None:
    """best.pt as the run's progress says it selected it, before the resumed training."""
    path = run.checkpoint("best")
    try:
        best = load_checkpoint(path)
        run.check_identity(best, path)
    except DmhpcError as exc:
        raise DmhpcError(f"{exc} (the run's selected checkpoint, tested at its end); put it back, or start "
                         f"the run anew with --resume none --overwrite") from None
    check_selected(best, best_score, path)


def _check_length(cfg, prog, position: int, total_steps: int, elsewhere) -> None:
    """Refuse a length shorter than what the run trained already (its config.yaml would say fewer
    epochs or steps than its log and checkpoints hold, and leaderboards read the config), a
    train.early_stopping the run went past (`check_patience`), and a new
    run from the checkpoint `elsewhere` (None: the run's own) that leaves it nothing to train: it
    would end with no best.pt of its own to test. `position`: the steps done, in this world's steps."""
    trained = prog.epoch + (prog.step_in_epoch > 0)
    if elsewhere is not None and position >= total_steps:
        raise DmhpcError(f"--resume {elsewhere}: trained {trained} epochs ({position} steps) already; a new run from "
                         f"it needs more to train: raise train.epochs (or train.max_steps)")
    check_epochs(cfg.train.epochs, prog.epoch, prog.step_in_epoch)
    check_steps(cfg.train.max_steps, position)
    check_patience(cfg.train.early_stopping, prog.longest_without_best, prog.evals_since_best)


def _check_warmup(optim, total_steps: float) -> None:
    """Refuse a warm-up as long as the run (`total_steps` in the first world's steps, as warmup_steps
    counts): the rate never reached optim.lr nor decayed to min_lr, and the run trained at a fraction
    of it without a word."""
    if optim.schedule == "warmup-cosine" and optim.warmup_steps >= total_steps:
        raise DmhpcError(f"optim.warmup_steps {optim.warmup_steps}: the run has {total_steps:g} steps, so its "
                         f"learning rate would never reach optim.lr; lower it, or train longer")


def _epoch_line(r: dict, criterion: str) -> str:
    head = f"epoch {r['epoch']} step {r['step']}: loss {r['loss'].get('total', math.nan):.4f}"
    tail = f"{r['images_per_s']:.0f} img/s"
    if "selection" not in r:  # (not an evaluated epoch: train.eval_every)
        return f"{head} | not evaluated (train.eval_every) | {tail}"
    val = {d: r[d].get("val", {}) for d in ("source", "target")}
    target = (f"target {val['target'].get('accuracy', math.nan):.3f}" if val["target"].get("labelled", True)
              else f"target (unlabelled) merger fraction {val['target'].get('merger_fraction', math.nan):.3f}")
    return (f"{head} | val acc source {val['source'].get('accuracy', math.nan):.3f} {target} | {criterion} "
            f"{r['selection'].get('score', math.nan):.4f} | {tail}")


def train_arguments(parser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="training configuration (YAML)")
    parser.add_argument("--resume", default="auto",
                        help="auto (default): continue from the run's last checkpoint if it has one; none: a "
                             "new run (an existing one only with --overwrite); or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --resume none or a checkpoint from elsewhere: replace the run already in "
                             "run.dir (its checkpoints, log and results)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.epochs=5 data.source=/scratch/pristine")


def train_main(args) -> int:
    # Errors here come before any process group starts.
    cfg = load_config(args.config, args.overrides, forwarded=os.environ.get("DMHPC_FORWARDED_SIGNAL"))
    if args.overwrite and args.resume == "auto":
        raise DmhpcError("--overwrite replaces a run: give it with --resume none (or a checkpoint from elsewhere)")
    return train(cfg, resume=args.resume, overwrite=args.overwrite)
