"""The paper reproductions' sections of ``mechkit demo`` (the job behind ``make demo``).

mechkit's demo writes the library's own sections and then every section registered under the
entry-point group ``mechkit.demo_sections``; this package registers :data:`SECTIONS` there (see
pyproject.toml), so the library never imports the reproductions. Sections: the IOI circuit
(Wang et al.), induction heads (Olsson et al.), greater-than (Hanna et al.), successor heads
(Gould et al.), and an IOI sparse feature circuit over the shipped SAEs and transcoder (Marks et
al.), which needs this package's IOI dataset. Each takes ``(model, out, quick=False)`` and
returns the section's HTML.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import mechkit as mk
from mechkit.core import parse_node
from mechkit.demo import DemoSection, figure_link, html_table

__all__ = ["SECTIONS", "FEATURE_CIRCUIT_SAES"]


def _ioi(model: Any, out: Path, quick: bool = False) -> str:
    from . import ioi

    def ours(published: list[str]) -> str:  # the paper's "9.6" in our names
        return ", ".join(str(parse_node(h)) for h in published) or "-"

    # quick (the test suite): path patching on 1 prompt, evaluation on 8 and head scores on
    # 4 repeated sequences; every class still comes out, the S-inhibition heads the tutorial
    # finds on 6 prompts among them (the demo test checks the name movers)
    n_prompts, n_path, n_eval, n_heads = (8, 1, 8, 4) if quick else (16, 8, 64, 16)
    report = ioi.reproduce(model, n_prompts=n_prompts, n_path_prompts=n_path,
                           n_eval_prompts=n_eval, head_prompts=n_heads)  # fmt: skip
    report.write(out / "ioi")
    rows = [
        [kind, ", ".join(report.heads(kind)) or "none found", ours(heads)]
        for kind, heads in [*ioi.PAPER_GPT2["classes"].items(), ("other direct", [])]
    ]
    a, e = report.assignment, report.evaluation
    return (
        f"<p>Wang et al.'s method: classes assigned on {n_prompts} prompts of the paper's 15 "
        'templates (report: <a href="ioi/index.html">ioi/index.html</a>, with the '
        "path-patching figures, the backup name movers, the circuit drawn as a graph and "
        '<a href="ioi/ioi.json">every number</a>). Logit difference '
        f"{report.logit_diff:.2f} (GPT-2 in the paper: 3.56), IO over S "
        f"{report.io_over_s:.0%}. The circuit's faithfulness with every other head "
        f"mean-ablated over p_ABC: {e['faithfulness']:.0%} on {e['n_prompts']} held-out "
        f"prompts ({a['faithfulness']:.0%} on the assignment prompts; GPT-2: 87%).</p>"
        + html_table(rows, ["class", "heads found here", "GPT-2 small (paper)"])
    )


def _induction(model: Any, out: Path, quick: bool = False) -> str:
    from . import induction

    # quick (the test suite): the same feeding heads, in the same order, as path patching on
    # 20-token repeats (measured); the copying scores from 32 tokens, not 256 (the same heads
    # and checks as at 64)
    quick_sizes = {"n_prompts": 4, "seq_len": 20, "n_path_prompts": 2, "path_heads": 1}
    quick_sizes |= {"path_seq_len": 10, "copying_tokens": 32}
    sizes = {**quick_sizes, "n_controls": 1, "icl_sequences": 2} if quick else {}
    report = induction.reproduce(model, **sizes)
    report.write(out / "induction")
    data = report.to_dict()
    heads = ", ".join(f"{h['head']} ({h['prefix_matching']:.2f})" for h in data["induction_heads"])
    feeding = ", ".join(h["head"] for h in data["previous_token_heads"]) or "none found"
    rows = [
        [name, *(f"{values.get(kind, float('nan')):+.2f}" for kind in ("zero", "mean"))]
        for name, values in report.ablation_summary().items()
    ]
    icl = report.icl.score
    return (
        "<p>Olsson et al.: prefix-matching and copying scores of every head, the in-context "
        "learning score, path patching into the induction heads' keys, and ablations (report: "
        '<a href="induction/index.html">induction/index.html</a>). Induction heads (prefix '
        f"matching): {html.escape(heads)}; previous-token heads feeding them: "
        f"{html.escape(feeding)}; in-context-learning score "
        f"{'n/a' if icl is None else f'{icl:+.2f} nats'}.</p>"
        + html_table(rows, ["heads ablated", "loss increase, zero ablation", "mean ablation"])
    )


def _greater_than(model: Any, out: Path, quick: bool = False) -> str:
    from . import greater_than

    n_prompts = 4 if quick else 16
    sizes = (30, 300) if quick else (30, 100, 300, 1000)
    report = greater_than.reproduce(model, n_prompts=n_prompts, sizes=sizes)
    report.write(out / "greater_than")
    note = (
        "SmolLM2's tokenizer writes years digit by digit, so the paper's two-digit metric does "
        "not exist for it; the metric here reads the tens digit (p(later) - p(earlier))."
        if report.mode == "one-digit"
        else "The paper's two-digit metric."
    )
    return (
        f"<p>Hanna et al.'s prompts ({n_prompts}; report: "
        '<a href="greater_than/index.html">greater_than/index.html</a>). '
        f"{html.escape(note)} Probability difference {report.clean_score:.0%}, after the "
        f'"01" corruption {report.corrupt_score:.0%}. Heads that restore it most: '
        f"{', '.join(report.top_heads(5))}; MLPs: {report.top_mlps()}.</p>"
    )


def _successor_heads(model: Any, out: Path, quick: bool = False) -> str:
    from . import successor_heads

    report = successor_heads.reproduce(model, random_draws=2 if quick else 5)
    report.write(out / "successor_heads")
    heads = ", ".join(f"{h['head']} ({h['succession_score']:.2f})" for h in report.heads)
    a, g, m = report.ablation, report.agreement, report.mod10
    rows = [
        [run, f"{a[run]['accuracy_among_items']:.0%}", f"{a[run]['log_prob']:+.2f}"]
        for run in ("clean", "successor heads ablated", "random heads ablated")
    ]
    probe = (
        "too few items past index 10 to test it"
        if m.get("accuracy") is None
        else f"a probe trained on items 1-10 reads the index mod 10 of items 11-20 with "
        f"accuracy {m['accuracy']:.0%} (constant guess {m['chance']:.0%}, shuffled labels "
        f"{m['control_accuracy']:.0%})"
    )
    return (
        "<p>Gould et al.'s succession score (each head's OV circuit on the effective "
        "embeddings of ordinal-sequence tokens, the successor ranked against every token of "
        f'the dataset; report: <a href="successor_heads/index.html">successor_heads/'
        f"index.html</a>). Successor heads: {html.escape(heads)} (GPT-2 small in the paper: "
        f'L9H1). <code>detect_heads(model, "successor")</code> ranks the heads alike '
        f"(Spearman {g['spearman']:.2f}, top-5 overlap {g['top5_overlap']:.0%}). Mod-10 "
        f"structure: {html.escape(probe)}. Mean-ablating the successor heads on "
        f'{a["n_prompts"]} prompts such as "Monday, Tuesday, Wednesday,":</p>'
        + html_table(rows, ["run", "successor beats the other items", "mean log-probability"])
    )


FEATURE_CIRCUIT_SAES = {
    "r6": "smollm2-135m-res6-topk",
    "r12": "smollm2-135m-res12-topk",
    "m12": "smollm2-135m-mlp12-skip-transcoder",
    "r18": "smollm2-135m-res18-topk",
    "r24": "smollm2-135m-res24-topk",
}


def _feature_circuit(model: Any, out: Path, quick: bool = False) -> str:
    from .ioi import ioi_dataset

    if getattr(model.cfg, "model_name", "") != "smollm2-135m":
        return "<p>Skipped: the shipped SAEs are for smollm2-135m.</p>"
    saes = {name: mk.load_sae(shipped) for name, shipped in FEATURE_CIRCUIT_SAES.items()}
    n_prompts, per, method = (8, 8, "attribution") if quick else (16, 20, "ig")
    data = ioi_dataset(model, n=n_prompts, seed=0)
    graph = mk.feature_circuit(
        model,
        saes,
        data.pairs,
        latents_per_dictionary=per,
        method=method,
        steps=10,
        progress=False,
    )
    graph.save(out / "feature_graph.json")
    circuit = graph.top_edges(60).prune()
    circuit.save(out / "feature_circuit.json")
    (out / "feature_circuit.svg").write_text(circuit.to_svg())
    (out / "feature_circuit.dot").write_text(circuit.to_dot())
    link = figure_link(out, "feature_circuit.html", circuit.plot(max_edges=60))
    scores = graph.node_scores or {}
    ranked = sorted((n for n in scores if n != "input"), key=lambda n: -abs(scores[n]))
    sizes = [n for n in (5, 10, 20, 40, 80) if n < len(ranked)] + [len(ranked)]
    errors = [n for n in ranked if n.endswith(".err")]
    latents = [n for n in ranked if not n.endswith(".err")]
    evaluation = mk.evaluate_feature_circuit(model, saes, [ranked[:n] for n in sizes], data.pairs)
    evaluation.to_dataframe().to_csv(out / "feature_faithfulness.csv", index=False)
    curve = figure_link(out, "feature_faithfulness.html", evaluation.plot())
    extra = mk.evaluate_feature_circuit(model, saes, [errors, errors + latents], data.pairs)
    rows = [
        [name, f"{scores[name]:+.3f}", graph.layout.descriptions.get(name, "")]
        for name in ranked[:12]
    ]
    faith = [[str(n), f"{f:.2f}"] for n, f, _ in evaluation.rows]
    faith += [
        ["the 5 error terms only", f"{extra.rows[0][1]:.2f}"],
        [f"the error terms and the graph's {len(latents)} latents", f"{extra.rows[1][1]:.2f}"],
    ]
    change = graph.ablated_score - graph.clean_score  # type: ignore[operator]
    shares = [
        [name, f"{scores[name + '.err']:+.2f}", f"{scores[name + '.err'] / change:.0%}"]
        for name in ("r6", "r12", "r18", "r24")
    ]
    return (
        f"<p>A sparse feature circuit (Marks et al. 2024) for IOI on {n_prompts} prompts: the "
        "shipped TopK SAEs after blocks 6, 12, 18 and 24 and the skip transcoder of MLP 12 "
        "spliced in, each latent and each dictionary's reconstruction error a node, scored by "
        f"{'integrated gradients (10 steps)' if method == 'ig' else 'attribution patching'} "
        f"against the p_ABC corruption (logit difference {graph.clean_score:.2f} clean, "
        f"{graph.ablated_score:.2f} corrupt). The {per} latents of largest |effect| per "
        f"dictionary are nodes; edges between them stop at every other dictionary. The 60 "
        f"strongest edges, pruned: {link}, "
        '<a href="feature_circuit.svg">SVG</a>, <a href="feature_circuit.dot">DOT</a>, '
        '<a href="feature_circuit.json">JSON</a> (whole graph: '
        '<a href="feature_graph.json">feature_graph.json</a>).</p>'
        + html_table(rows, ["node", "effect of corrupting it", "decoder promotes"])
        + "<p>Each SAE on the residual stream carries the whole clean-to-corrupt change "
        f"({change:+.2f}) between its latents and its error term"
        + (
            " (integrated gradients split it exactly, up to the 10-step sum)"
            if method == "ig"
            else ""
        )
        + ". The error terms' shares:</p>"
        + html_table(shares, ["SAE", "error term's effect", "share of the change"])
        + "<p>These dictionaries, trained for minutes on Python documentation, leave much of the "
        "IOI sentences' name information in their errors. Faithfulness (every node outside the "
        "circuit set to its corrupt-run value; 1 = the model, 0 = all nodes corrupted) of the "
        f"top-n nodes by |effect| ({curve}, "
        '<a href="feature_faithfulness.csv">CSV</a>):</p>'
        + html_table(faith, ["nodes kept", "faithfulness"])
    )


SECTIONS: tuple[DemoSection, ...] = (
    ("IOI circuit (Wang et al. 2022)", _ioi),
    ("Induction heads (Olsson et al. 2022)", _induction),
    ("Greater-than (Hanna et al. 2023)", _greater_than),
    ("Successor heads (Gould et al. 2023)", _successor_heads),
    ("Sparse feature circuit (IOI)", _feature_circuit),
)
