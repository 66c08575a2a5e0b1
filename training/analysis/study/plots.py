"""The study's plots: norm ratio along the sampling trajectory, the trainer's logged ratio over training,
evaluation reward over training with the matched steps, few-step reward and FD, adjoint coherence per step.
"""

from __future__ import annotations

from training.analysis.io import pyplot
from training.analysis.study.grid import METHODS, REFERENCE, label, run_keys
from training.analysis.study.matching import eval_reward_curve, trailing_mean
from training.tracking import save_figure


def _style(key):
    if key[0] == "reference":
        return dict(color="black", ls="--")
    return dict(color={"off": "tab:red", "on": "tab:blue"}[key[1]], ls={"nft": "-", "awm": "-.", "dpo": ":"}[key[0]])


def plot_study(out_dir, rows, ratio_rows_all, adjoint_rows, logged, matches, train_info, meta):
    from training.analysis.norms import norm_ratio_over_training

    plt = pyplot()
    seeds = meta["seeds"]
    colors = {"off": "tab:red", "on": "tab:blue"}
    seed_alpha = {s: 1.0 - 0.45 * i / max(len(seeds) - 1, 1) for i, s in enumerate(seeds)}
    finals = [k for k in run_keys(rows) if k[3] == "final"]
    # 1. ratio by timestep along the sampling trajectory, one panel per method
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.4), sharey=True)
    for ax, method in zip(axes, METHODS):
        for key in (k for k in finals if k[0] == method):
            rr = [r for r in ratio_rows_all if (r["method"], r["normguard"], r["seed"], r["checkpoint"]) == key]
            sig = [r["sigma"] for r in rr]
            ax.plot(sig, [r["ratio_mean"] for r in rr], "o-", color=colors[key[1]], alpha=seed_alpha[key[2]],
                    label=f"NG-{key[1]} s{key[2]}")
            ax.fill_between(sig, [r["ratio_p10"] for r in rr], [r["ratio_p90"] for r in rr], color=colors[key[1]],
                            alpha=0.08)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.invert_xaxis()
        ax.set_title(method)
        ax.set_xlabel("sigma at the step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("||v_theta|| / ||v_ref|| (mean, 10-90 %)")
    axes[0].legend(fontsize=7)
    save_figure(fig, out_dir / "norm_ratio_by_timestep.png")
    # 2. the trainer's logged ratio over training
    norm_ratio_over_training({f"{m} NG-{ng} s{s}": info["run_dir"] for (m, ng, s), info in sorted(train_info.items())},
                             out_dir / "norm_ratio_over_training.png")
    # 3. evaluation reward over training, with the matched step
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.4), sharey=True)
    for ax, method in zip(axes, METHODS):
        for (m, ng, s), log in logged.items():
            if m != method:
                continue
            curve = eval_reward_curve(log)
            ax.plot(range(1, len(curve) + 1), trailing_mean(curve, meta["match_window"]), color=colors[ng],
                    alpha=seed_alpha[s], label=f"NG-{ng} s{s}")
        for (m, s), match in matches.items():
            if m == method:
                ax.axvline(match["step"], color=colors["off"], ls=":", alpha=seed_alpha[s])
        ax.set_title(method + " (dotted: NG-off matched steps)")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"eval reward (trailing mean {meta['match_window']})")
    axes[0].legend(fontsize=7)
    save_figure(fig, out_dir / "reward_curves.png")
    # 4. few-step: reward and FD vs steps
    fig, (ax_r, ax_q) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in [REFERENCE] + finals:
        pts = sorted((r["num_steps"], r["reward_mean"], r["fd"]) for r in rows if r["sampling"] == "plain" and
                     (r["method"], r["normguard"], r["seed"], r["checkpoint"]) == key)
        for ax, i in ((ax_r, 1), (ax_q, 2)):
            ax.plot([p[0] for p in pts], [p[i] for p in pts], marker="o", label=label(*key), **_style(key))
    for ax, name in ((ax_r, "reward"), (ax_q, "FD to data (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_q.legend(fontsize=6, ncol=2)
    save_figure(fig, out_dir / "few_step.png")
    # 5. adjoint coherence per step
    if adjoint_rows:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for key in [REFERENCE] + finals:
            pts = [a for a in adjoint_rows if (a["method"], a["normguard"], a["seed"], a["checkpoint"]) == key]
            ax.plot([a["sigma"] for a in pts], [a["mean_over_std"] for a in pts], marker="o", label=label(*key),
                    **_style(key))
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("sigma at the step")
        ax.set_ylabel("mean / std of dR/d alpha_k over the batch")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
        save_figure(fig, out_dir / "adjoint_coherence.png")
