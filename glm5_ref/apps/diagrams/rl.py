"""The RL diagrams for notebook 08: synchronous vs asynchronous rollouts on a time axis, and the TITO gateway.

    from glm5_ref.apps.diagrams.rl import sync_async_timeline, tito_gateway
    show_figure(sync_async_timeline(), "08_sync_async_timeline.png")
    show_figure(tito_gateway(), "08_tito_gateway.png")

Both are schematic (the bar lengths are made up, not measured). The names are those of the project's loop:
``glm5_ref.apps.agentic.AsyncRLLoop`` (rollout workers, PolicyStore.publish = the weight push, staleness
w' - w_0 <= tau) and ``glm5_ref.tito.TITOGateway`` (start / generate / record_environment / finish, Trajectory).
"""

from __future__ import annotations

from glm5_ref.apps.diagrams import COLORS, arrow, box, canvas, legend

ROW_H = 0.42


def _bar(ax, x0: float, x1: float, y: float, text: str, kind: str, fontsize: float = 7.5):
    """A bar from time x0 to x1 on the row at height y (a box of exactly that width)."""
    return box(ax, ((x0 + x1) / 2, y), text, kind=kind, w=x1 - x0 - 0.04, h=ROW_H, fontsize=fontsize)


def _swatch(ax, x: float, y: float, kind: str, text: str) -> float:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y - 0.1), 0.3, 0.2, fc=COLORS[kind], ec="#555555", lw=0.8))
    ax.text(x + 0.38, y, text, fontsize=8, va="center")
    return x + 0.6 + 0.075 * len(text)


def sync_async_timeline():
    """Three rollout workers and the trainer on a time axis. Synchronous: every worker generates, the batch
    waits for its slowest rollout, then the trainer trains while the workers idle. Asynchronous: workers keep
    generating; the trainer trains on whatever groups are complete, pushes new weights (a new policy version)
    after each update, and a worker picks them up at its next turn, so samples carry versions and can be
    stale."""
    fig, ax = canvas(13.0, 8.0, "Synchronous vs asynchronous RL rollouts (schematic; time runs to the right)")
    x0, x1 = 1.9, 12.8
    rows = ["worker 0", "worker 1", "worker 2", "trainer"]

    def lane(top: float, title: str):
        ax.text(0.1, top + 0.75, title, fontsize=10, weight="bold", va="center")
        ys = [top - 0.55 * i for i in range(len(rows))]
        for name, y in zip(rows, ys):
            ax.text(x0 - 0.12, y, name, fontsize=8.5, ha="right", va="center")
            ax.plot([x0, x1], [y - ROW_H / 2 - 0.03] * 2, color="#dddddd", lw=0.6)
        arrow(ax, (x0, ys[-1] - 0.38), (x1, ys[-1] - 0.38), style="-|>", color="#777777")
        ax.text(x1, ys[-1] - 0.5, "time", fontsize=8, ha="right", va="top", color="#777777")
        return ys

    # synchronous: generate (long tail), wait, train, push; twice
    ys = lane(7.0, "synchronous: generate, then train")
    t = x0
    for version, lens in ((0, (2.0, 1.3, 3.1)), (1, (1.5, 2.6, 1.1))):
        end = t + max(lens)
        for w, length in enumerate(lens):
            _bar(ax, t, t + length, ys[w], f"rollouts, v{version}", "op")
            if t + length < end - 0.05:
                _bar(ax, t + length, end, ys[w], "idle", "bad")
        if end - t > 0.3:
            _bar(ax, t, end, ys[3], "idle: waits for the slowest rollout", "bad")
        _bar(ax, end, end + 1.2, ys[3], f"train -> v{version + 1}", "weight")
        for w in range(3):
            _bar(ax, end, end + 1.2, ys[w], "idle", "bad")
        arrow(ax, (end + 1.2, ys[3] + ROW_H / 2), (end + 1.2, ys[0] + ROW_H / 2 + 0.02), color="#7a3db8",
              ls="--", style="-|>")
        ax.text(end + 1.25, ys[0] + ROW_H / 2 + 0.12, f"push v{version + 1}", fontsize=7.5, color="#7a3db8")
        t = end + 1.2

    # asynchronous: workers never wait; the trainer updates whenever enough groups are complete
    ys = lane(3.6, "asynchronous: rollouts continue while the trainer updates")
    pushes = [4.6, 6.4, 8.2, 10.0, 11.8]  # the ends of the trainer's updates = the weight pushes v1, v2, ...
    for k, end in enumerate(pushes):
        _bar(ax, end - 1.2, end, ys[3], f"train -> v{k + 1}", "weight")
        arrow(ax, (end, ys[3] + ROW_H / 2), (end, ys[0] + ROW_H / 2 + 0.02), color="#7a3db8", ls="--",
              style="-|>")
        ax.text(end + 0.05, ys[0] + ROW_H / 2 + 0.12, f"push v{k + 1}", fontsize=7.5, color="#7a3db8")
    _bar(ax, x0, pushes[0] - 1.2, ys[3], "idle: no batch yet", "bad", fontsize=7)
    bars = {  # worker -> [(start, end, label, kind)]: a label names the versions the rollout sampled with
        0: [(x0, 3.4, "v0", "op"), (3.4, 5.6, "v0 -> v1", "op"), (5.6, 7.6, "v1 -> v2", "op"),
            (7.6, 9.2, "v2 -> v3", "op"), (9.2, 11.0, "v3 -> v4", "op"), (11.0, 12.7, "v4 -> v5", "op")],
        1: [(x0, 3.0, "v0", "op"), (3.0, 4.2, "v0", "op"),
            (4.2, 10.6, "v0 ... v4: a long rollout, stale when it ends (w' - w_0 > tau): dropped", "bad"),
            (10.6, 12.7, "v4 -> v5", "op")],
        2: [(x0, 4.0, "v0", "op"), (4.0, 5.2, "v0 -> v1", "op"), (5.2, 7.0, "v1 -> v2", "op"),
            (7.0, 8.8, "v2 -> v3", "op"), (8.8, 10.4, "v3 -> v4", "op"), (10.4, 12.7, "v4 -> v5", "op")],
    }
    for w, items in bars.items():
        for a, b, text, kind in items:
            _bar(ax, a, b, ys[w], text, kind)

    # what the labels mean
    y = 0.95
    x = _swatch(ax, 0.2, y, "op", "rollout (label: policy versions it sampled with, w_0 -> w_k)")
    x = _swatch(ax, x, y, "weight", "trainer update")
    _swatch(ax, x, y, "bad", "idle, or a sample dropped as stale (w' - w_0 > tau)")
    ax.text(0.2, 0.08, "A worker loads the newest pushed weights before each turn (dashed arrows), so one "
            "rollout can span versions. A group trains once\nall its G samples are back; the trainer resets "
            "its optimizer after every push.", fontsize=8, va="bottom", color="#333333")
    return fig


def tito_gateway():
    """TITO: every generation request goes through the gateway, which records, per rollout id, the prompt
    ids, the sampled ids with the sampler's log-probs and policy version, and the environment's ids; the
    trainer receives exactly those lists. The text-in-text-out path (decode, re-encode) is shown crossed."""
    fig, ax = canvas(13.0, 6.6, "The TITO gateway: token ids in, token ids out, nothing re-tokenized")
    task = box(ax, (1.55, 5.0), "rollout task\n(agent loop)\nrun_rollout", kind="note", w=2.5)
    gw = box(ax, (6.5, 5.0), "TITO gateway\n(glm5_ref.tito.TITOGateway)\none record per rollout id",
             kind="op", w=3.3)
    eng = box(ax, (11.35, 5.0), "inference engine\npolicy at version v\n(model.generate)", kind="weight", w=2.6)
    # requests and answers (two arrows per pair of boxes, offset vertically)
    arrow(ax, (task.x + task.w / 2, 5.22), (gw.x - gw.w / 2, 5.22), "generate\n(rollout id)", offset=0.06)
    arrow(ax, (gw.x - gw.w / 2, 4.78), (task.x + task.w / 2, 4.78), "new ids (decoded\nonly to run the tool)",
          offset=-0.5)
    arrow(ax, (gw.x + gw.w / 2, 5.22), (eng.x - eng.w / 2, 5.22), "the rollout's\nids so far", offset=0.06)
    arrow(ax, (eng.x - eng.w / 2, 4.78), (gw.x + gw.w / 2, 4.78), "sampled ids, their\nlog-probs, version v",
          offset=-0.5)
    env = box(ax, (1.55, 2.6), "environment output\n(tool result), appended\nas ids with loss mask 0\n"
                               "(record_environment)", kind="note", w=2.5)
    arrow(ax, task, env)
    arrow(ax, env, (gw.x - gw.w / 2 + 0.3, gw.y - gw.h / 2))
    rec = box(ax, (6.2, 2.35),
              "Trajectory 'g3-s1' (one rollout id)\n"
              "prompt: ids (loss mask 0)\n"
              "model: ids + log-probs, version 4 (mask 1)\n"
              "env: ids (mask 0)\n"
              "model: ids + log-probs, version 5 (mask 1)\n"
              "+ reward, failed?, versions w_0 <= ... <= w_k",
              kind="cache", w=4.0, fontsize=8.5)
    arrow(ax, (gw.x, gw.y - gw.h / 2), (rec.x + 0.3, rec.y + rec.h / 2), "finish(rollout id)", offset=0.1)
    tr = box(ax, (11.3, 2.35), "trainer\nlog pi_theta on the SAME ids\nr_t = exp(log pi_theta - log pi_rollout)\n"
                               "drop if w' - w_0 > tau", kind="weight", w=3.1, fontsize=8.5)
    arrow(ax, rec, tr, "ids, rollout log-probs,\nloss mask, versions\n(unchanged)", offset=0.12)
    bad = box(ax, (2.45, 0.75), "text-in-text-out (not used): decode -> re-encode\n"
                                "[' ', 'return'] -> [' return']: the stored log-probs\nnow sit on tokens never sampled",
              kind="bad", w=4.5, fontsize=8)
    ax.plot([bad.x - bad.w / 2, bad.x + bad.w / 2], [bad.y - bad.h / 2, bad.y + bad.h / 2], color="#b03030", lw=1)
    legend(ax, ["op", "weight", "cache", "note", "bad"], xy=(7.6, 0.6))
    return fig
