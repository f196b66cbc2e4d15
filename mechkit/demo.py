"""The main job behind ``make demo``: run mechkit's analyses on a model and write a report.

The report is a folder with ``index.html`` linking each section's figures (plotly HTML sharing
one ``plotly.min.js`` in the folder, so the report opens offline) and tables (CSV). mechkit's
own sections: the model card, next-token predictions, the logit lens, direct logit attribution
on IOI prompts, attention-head detection, activation and path patching on IOI prompts,
attribution patching and the IOI circuit graph with its faithfulness curve, a steering sweep
(effect against cost, with sampled generations), the shipped SAE's evaluation and feature
browser, and one section per method family (input attribution, context mixing, probes and
concept erasure, causal tracing and ROME, scaling out; each family's ``demo_section``).
Then every section registered under the entry-point group ``mechkit.demo_sections`` (each
entry point names a sequence of ``(title, section)``): the paper reproductions
(``mechkit_circuits``, the repository's ``circuits/``) register the IOI, induction,
greater-than and successor-heads reproductions and an IOI sparse feature circuit over the
shipped SAEs and transcoder. mechkit never imports them itself. Each section is timed.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from mechkit.atomic_io import write_text_atomically
from mechkit.attribution import compare_attribution
from mechkit.core.names import parse_node
from mechkit.corpus import corpus_tokens
from mechkit.decomposition import direct_logit_attribution
from mechkit.distributed.demo import demo_section as _scaling
from mechkit.editing import demo_section as _editing
from mechkit.graph import edge_attribution, faithfulness_curve
from mechkit.heads import detect_heads
from mechkit.input_attribution import demo_section as _input_attribution
from mechkit.lens import logit_lens
from mechkit.mixing import demo_section as _mixing
from mechkit.models import load_model, model_info
from mechkit.patching import activation_patch, path_patch
from mechkit.predictions import predict_next_tokens
from mechkit.probing.demo import demo_section as _probing
from mechkit.prompts import PromptPairs
from mechkit.report_parts import figure_link, html_table
from mechkit.sae.base import load_sae
from mechkit.sae.browser import feature_browser
from mechkit.sae.evaluate import evaluate_sae
from mechkit.sites import Site
from mechkit.steering import WordShare, mean_difference_vector, steering_sweep

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "DEMO_PROMPTS",
    "IOI_PAIRS",
    "SECTIONS",
    "DemoSection",
    "figure_link",
    "html_table",
    "registered_sections",
    "run_demo",
]

# A section: its title, and a function (model, out folder[, quick=...]) -> the section's HTML.
# A section that takes ``quick`` gets the demo's quick flag (fewer prompts and settings: the
# test suite runs the whole demo that way).
DemoSection = tuple[str, Callable[..., str]]
SECTION_GROUP = "mechkit.demo_sections"

DEMO_PROMPTS = (
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is",
    "def add(a, b):\n    return a",
    "One, two, three, four,",
)

# (clean, corrupt, answer, wrong): IOI prompts with their p_ABC-style corruptions
IOI_PAIRS = (
    (
        "When Mary and John went to the store, John gave a drink to",
        "When Alice and Bob went to the store, Carl gave a drink to",
        " Mary",
        " John",
    ),
    (
        "When Tom and James went to the park, James gave a ball to",
        "When Mike and Dan went to the park, Paul gave a ball to",
        " Tom",
        " James",
    ),
    (
        "After Sarah and Emma arrived at the house, Emma handed a book to",
        "After Lucy and Kate arrived at the house, Anna handed a book to",
        " Sarah",
        " Emma",
    ),
    (
        "Then, David and Paul had lunch at the cafe. Paul gave a cup to",
        "Then, Peter and Mark had lunch at the cafe. Alex gave a cup to",
        " David",
        " Paul",
    ),
)


def _model_card(model: HookedTransformer, out: Path) -> str:
    info = model_info(model)
    cfg = model.cfg
    card = {
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "heads": f"{cfg.n_heads} (key/value heads: {cfg.n_key_value_heads or cfg.n_heads})",
        "d_mlp": cfg.d_mlp,
        "vocabulary": cfg.d_vocab,
        **{k: v for k, v in dataclasses.asdict(info).items() if k != "processing"},
        "processing": ", ".join(f"{k}={v}" for k, v in info.processing.as_dict().items()),
    }
    return html_table([[k, v] for k, v in card.items()], ["property", "value"])


def _predictions(model: HookedTransformer, out: Path) -> str:
    preds = predict_next_tokens(model, list(DEMO_PROMPTS), k=5)
    preds.to_dataframe().to_csv(out / "next_tokens.csv", index=False)
    link = figure_link(out, "next_tokens.html", preds.plot())
    rows = []
    for i, prompt in enumerate(preds.prompts):
        cells = zip(preds.tokens[i], preds.probs[i].tolist(), strict=True)
        rows.append([prompt, *(f"{t!r} {p:.2f}" for t, p in cells)])
    return (
        f"<p>Top 5 next tokens and their probabilities ({link}, "
        '<a href="next_tokens.csv">CSV</a>).</p>'
        + html_table(rows, ["prompt", "1", "2", "3", "4", "5"])
    )


def _logit_lens(model: HookedTransformer, out: Path) -> str:
    clean, _, answer, _ = IOI_PAIRS[0]
    lens = logit_lens(model, clean, targets=[answer])
    grid = figure_link(out, "logit_lens.html", lens.plot())
    rank = figure_link(out, "logit_lens_answer_rank.html", lens.plot_target(0, value="rank"))
    assert lens.target_ranks is not None  # targets were given
    ranks = lens.target_ranks[:, 0, -1, 0].tolist()
    first = next((i for i, r in enumerate(ranks) if r == 0), None)
    where = lens.layer_labels[first] if first is not None else "never"
    return (
        f"<p>Each layer's residual stream decoded with the final norm (recomputed per layer) and "
        f"the unembedding, on <code>{html.escape(clean)}</code>: {grid}. The rank of "
        f"<code>{html.escape(repr(answer))}</code> by layer: {rank}; it first becomes the top "
        f"prediction at <b>{html.escape(where)}</b>.</p>"
    )


def _dla(model: HookedTransformer, out: Path) -> str:
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*IOI_PAIRS, strict=True))
    pairs = PromptPairs.from_lists(model, clean, corrupt, answers, wrongs, aligned=False)
    dla = direct_logit_attribution(model, pairs)
    dla.to_dataframe().to_csv(out / "dla.csv", index=False)
    link = figure_link(out, "dla.html", dla.plot())
    rows = [[label, f"{value:+.3f}"] for label, value in dla.top(10)]
    return (
        f"<p>Direct contribution of every head, MLP and bias to logit(IO) - logit(S) on "
        f"{len(pairs)} IOI prompts (final-norm scale frozen; the parts sum to the model's logit "
        f"difference, mean {float(dla.total.mean()):.2f}): {link}, "
        '<a href="dla.csv">CSV</a>.</p>' + html_table(rows, ["part", "mean contribution"])
    )


def _heads(model: HookedTransformer, out: Path, quick: bool = False) -> str:
    parts = []
    for kind in ("previous_token", "induction", "duplicate_token"):
        scores = detect_heads(model, kind, n_prompts=4 if quick else 16)
        link = figure_link(out, f"heads_{kind}.html", scores.plot())
        top = ", ".join(f"{label} ({score:.2f})" for label, score in scores.top(5))
        parts.append(f"<li><b>{kind}</b>: {link}; top heads {html.escape(top)}</li>")
    return "<ul>" + "".join(parts) + "</ul>"


def _ioi_pairs(quick: bool) -> tuple[list[str], ...]:
    chosen = IOI_PAIRS[:2] if quick else IOI_PAIRS
    return tuple(list(x) for x in zip(*chosen, strict=True))


def _patching(model: HookedTransformer, out: Path, quick: bool = False) -> str:
    clean, corrupt, answers, wrongs = _ioi_pairs(quick)
    pairs = PromptPairs.from_lists(model, clean, corrupt, answers, wrongs)
    resid = activation_patch(model, pairs, site="resid_pre", progress=False).normalized()
    heads = activation_patch(model, pairs, site="z", progress=False).normalized()
    resid.to_dataframe().to_csv(out / "patch_resid_pre.csv", index=False)
    heads.to_dataframe().to_csv(out / "patch_heads.csv", index=False)
    resid_link = figure_link(out, "patch_resid_pre.html", resid.plot())
    heads_link = figure_link(out, "patch_heads.html", heads.plot())
    top = heads.top(3)
    receivers = [Site("q", layer=w["layer"], head=w["head"]) for w, _ in top[: 1 if quick else 2]]
    path = path_patch(model, pairs, senders="heads", receivers=receivers, progress=False)
    path = path.normalized()
    path.to_dataframe().to_csv(out / "path_patch.csv", index=False)
    path_link = figure_link(out, "path_patch.html", path.plot())
    rows = [[f"L{w['layer']}H{w['head']}", f"{v:+.3f}"] for w, v in top]
    path_rows = [[f"L{w['layer']}H{w['head']}", f"{v:+.3f}"] for w, v in path.top(5)]
    names = ", ".join(r.label for r in receivers)
    return (
        f"<p>Denoising activation patching on {len(pairs)} IOI pairs (clean values patched into "
        "the p_ABC-style corrupt run; 1 = the clean logit difference restored, 0 = the corrupt "
        f"one). Residual stream by layer and position: {resid_link} "
        '(<a href="patch_resid_pre.csv">CSV</a>); each head\'s output at all positions: '
        f'{heads_link} (<a href="patch_heads.csv">CSV</a>).</p>'
        + html_table(rows, ["head", "normalized score"])
        + f"<p>Path patching (noising, Wang et al.): every head as a sender into the queries of "
        f"{html.escape(names)}, the top heads above; a drop below 1 means the head feeds them "
        f'what they need: {path_link} (<a href="path_patch.csv">CSV</a>).</p>'
        + html_table(path_rows, ["sender", "normalized score"])
    )


def _circuit(model: HookedTransformer, out: Path, quick: bool = False) -> str:
    clean, corrupt, answers, wrongs = _ioi_pairs(quick)
    pairs = PromptPairs.from_lists(model, clean, corrupt, answers, wrongs)
    cmp = compare_attribution(model, pairs, site="z", progress=False)
    cmp.to_dataframe().to_csv(out / "attribution_vs_patching.csv", index=False)
    cmp_link = figure_link(out, "attribution_vs_patching.html", cmp.plot())
    worst = [[f"L{c['layer']}H{c['head']}", f"{e:+.3f}", f"{r:+.3f}"] for c, e, r in cmp.worst(3)]
    steps = 2 if quick else 5
    graphs = [
        edge_attribution(model, pairs, method="eap", progress=False),
        edge_attribution(model, pairs, method="eap-ig-inputs", steps=steps, progress=False),
    ]
    sizes = [30, 300, 3000] if quick else [30, 100, 300, 1000, 3000, 10000]
    curve = faithfulness_curve(model, graphs, pairs, sizes=sizes)
    curve.to_dataframe().to_csv(out / "faithfulness.csv", index=False)
    curve_link = figure_link(out, "faithfulness.html", curve.plot())
    circuit = graphs[1].greedy(150).prune()
    circuit.save(out / "ioi_circuit.json")
    (out / "ioi_circuit.dot").write_text(circuit.to_dot())
    (out / "ioi_circuit.svg").write_text(circuit.to_svg())
    graph_link = figure_link(out, "ioi_circuit.html", circuit.plot())
    frame = curve.to_dataframe()
    rows = [
        [str(size)]
        + [f"{frame[(frame['size'] == size) & (frame['method'] == m)]['faithfulness'].iloc[0]:.2f}"
           for m in curve.methods]
        for size in sizes
    ]  # fmt: skip
    heads = [n for n in circuit.nodes_in_circuit() if parse_node(n).kind == "head"]
    return (
        f"<p>Attribution patching (one gradient) against activation patching of every head's "
        f"output on the {len(pairs)} IOI pairs: Pearson r {cmp.pearson:.3f}, Spearman "
        f"{cmp.spearman:.3f} on normalized scores: {cmp_link} "
        '(<a href="attribution_vs_patching.csv">CSV</a>). Worst estimates:</p>'
        + html_table(worst, ["head", "attribution", "activation patching"])
        + f"<p>Edge attribution over all {graphs[0].layout.n_edges} edges of the graph (input, "
        "every head's q/k/v inputs, every MLP, the logits) with EAP and EAP-IG "
        f"({steps} steps on the input embeddings), and the normalized faithfulness "
        "of each method's top-n edges, every "
        f"other edge carrying its corrupt-run value: {curve_link} "
        '(<a href="faithfulness.csv">CSV</a>).</p>'
        + html_table(rows, ["edges", *curve.methods])
        + f"<p>A circuit grown greedily from the logits (EAP-IG scores, 150 edges, pruned to "
        f"{circuit.n_edges}): {graph_link}, "
        '<a href="ioi_circuit.svg">SVG</a>, <a href="ioi_circuit.dot">Graphviz DOT</a>, '
        f'<a href="ioi_circuit.json">JSON</a>. Heads in it: {html.escape(", ".join(heads))}.</p>'
    )


def _features(model: HookedTransformer, out: Path, quick: bool = False) -> str:
    if getattr(model.cfg, "model_name", "") != "smollm2-135m":
        return "<p>Skipped: the shipped SAE is for smollm2-135m.</p>"
    sae = load_sae("smollm2-135m-res12-topk")  # shipped inside mechkit
    tokens = corpus_tokens(model, seq_len=128, split="test", max_sequences=2 if quick else 8)
    ev = evaluate_sae(model, sae, tokens, progress=False)
    # latents by firing frequency (from the evaluation, position 0 left out): frequent, not the
    # densest
    latents = ev.frequency.argsort(descending=True)[20 : 24 if quick else 28].tolist()
    feature_browser(model, sae, tokens, latents, out=out / "features.html", progress=False)
    rows = [
        ["L0", f"{ev.l0:.1f}"],
        ["explained variance", f"{ev.explained_variance:.3f}"],
        ["cross-entropy recovered (vs zero / mean ablation)",
         f"{ev.ce_recovered:.3f} / {ev.ce_recovered_mean:.3f}"],
        ["CE clean / spliced (nats)", f"{ev.ce_clean:.3f} / {ev.ce_sae:.3f}"],
        ["dead / dense latents", f"{ev.n_dead} / {ev.n_dense}"],
    ]  # fmt: skip
    return (
        f"<p>The TopK SAE shipped with mechkit ({sae.cfg.d_sae} latents, k={sae.cfg.k}, on "
        f"{html.escape(sae.cfg.hook_name)}; trained by "
        "<code>python -m mechkit.sae.recipes.train_smollm2_topk</code>), evaluated on "
        f"{tokens.numel()} held-out tokens, and a feature browser for {len(latents)} of its "
        "latents: "
        '<a href="features.html">features.html</a>.</p>' + html_table(rows, ["figure", "value"])
    )


STEERING_PAIRS = (
    ("I love this. It is wonderful", "I hate this. It is terrible"),
    ("What a great day, I am so happy", "What an awful day, I am so sad"),
    ("This is excellent and beautiful", "This is horrible and ugly"),
    ("I really enjoyed it, fantastic", "I really disliked it, dreadful"),
    ("The best thing ever, amazing", "The worst thing ever, disgusting"),
    ("Such a lovely and delightful time", "Such a miserable and painful time"),
)
POSITIVE_WORDS = (
    "great",
    "perfect",
    "wonderful",
    "love",
    "happy",
    "beautiful",
    "amazing",
    "excellent",
    "enjoy",
    "delight",
    "fantastic",
    "best",
    "celebrat",
    "exciting",
)
STEERING_PROMPTS = (
    "I think the movie was",
    "The food at the restaurant was",
    "My day today has been",
    "The weather this weekend is",
)


def _steering(model: HookedTransformer, out: Path, quick: bool = False) -> str:
    positives, negatives = (list(x) for x in zip(*STEERING_PAIRS, strict=True))
    layers = (8,) if quick else (4, 8, 12)
    coefficients = [4.0] if quick else [2.0, 4.0, 8.0]
    prompts = STEERING_PROMPTS[:2] if quick else STEERING_PROMPTS
    vectors = {
        layer: mean_difference_vector(model, positives, negatives, layer=layer, position="mean")
        for layer in layers
    }
    sweep = steering_sweep(
        model,
        vectors,
        layers=list(vectors),
        coefficients=coefficients,
        effect=WordShare(prompts, POSITIVE_WORDS, samples_per_prompt=2, max_new_tokens=12),
        cost_tokens=corpus_tokens(model, seq_len=64, split="test", max_sequences=2 if quick else 4),
        sample_prompts=prompts,
        sample_settings=[(8, 4.0)] if quick else [(8, 4.0), (12, 4.0)],
        max_new_tokens=16,
        progress=False,
    )
    sweep.to_dataframe().to_csv(out / "steering_sweep.csv", index=False)
    link = figure_link(out, "steering_sweep.html", sweep.plot())
    table = sweep.samples_table()
    table.to_csv(out / "steering_samples.csv", index=False)
    rows = [[str(v) for v in row] for row in table.itertuples(index=False)]
    return (
        "<p>A sentiment direction (mean difference of the residual stream over 6 positive / "
        "negative sentence pairs, averaged over their tokens; Rimsky et al.'s CAA) added at all "
        f"positions at layers {', '.join(map(str, layers))} with coefficients "
        f"{', '.join(f'{c:g}' for c in coefficients)}. Effect: the share of sampled "
        f"continuations of {len(prompts)} neutral prompts (2 samples each, 12 tokens) that contain "
        f"a positive word ({', '.join(POSITIVE_WORDS)}; unsteered: "
        f"{sweep.baseline_effect:.2f}); cost: KL from the unsteered model on held-out text: "
        f'{link} (<a href="steering_sweep.csv">CSV</a>). Sampled continuations (temperature '
        "1, the same seed in every column):</p>" + html_table(rows, list(table.columns))
    )


SECTIONS: tuple[DemoSection, ...] = (
    ("Model", _model_card),
    ("Next-token predictions", _predictions),
    ("Logit lens", _logit_lens),
    ("Direct logit attribution (IOI)", _dla),
    ("Attention heads", _heads),
    ("Activation and path patching (IOI)", _patching),
    ("Attribution patching and the circuit graph (IOI)", _circuit),
    ("Steering (activation addition)", _steering),
    ("Sparse autoencoder features", _features),
    ("Input attribution", _input_attribution),
    ("Context mixing", _mixing),
    ("Probes, concept erasure and DAS", _probing),
    ("Causal tracing and editing (ROME)", _editing),
    ("Scaling out (Ray, torch.distributed, several GPUs)", _scaling),
)


def registered_sections() -> tuple[DemoSection, ...]:
    """The sections other packages register under ``mechkit.demo_sections``, by entry-point
    name (the paper reproductions register ``reproductions``).

    Example:
        >>> all(callable(run) for _name, run in registered_sections())  # (name, section)
        True
    """

    sections: list[DemoSection] = []
    for point in sorted(entry_points(group=SECTION_GROUP), key=lambda p: p.name):
        try:
            sections.extend(point.load())
        except ImportError as exc:  # registered by a stale install: say so, write the rest
            print(
                f"[mechkit demo] skipped the sections registered as {point.value!r}, which "
                f"cannot be imported ({exc}). Hint: reinstall the package that registers them "
                "(`pip install -e .` in a checkout of mechkit).",
                file=sys.stderr,
                flush=True,
            )
    return tuple(sections)


def run_demo(
    out_dir: str | Path = "reports",
    model_name: str = "smollm2-135m",
    *,
    quick: bool = False,
    sections: Sequence[DemoSection] | None = None,
) -> Path:
    """Load ``model_name``, run every section, and write ``out_dir/index.html``.

    ``quick=True`` runs every section on fewer prompts and settings (the test suite uses it);
    the page says so. ``sections`` defaults to mechkit's own :data:`SECTIONS` followed by
    :func:`registered_sections`; without any registered (the paper reproductions not installed)
    the report says so and how to install them.

    Example:
        >>> import tempfile
        >>> from mechkit.demo import SECTIONS
        >>> with tempfile.TemporaryDirectory() as folder:  # the model card only, on the toy model
        ...     index = run_demo(folder, "attn-only-2l", sections=SECTIONS[:1])
        ...     print(index.name, "<h2>Model</h2>" in index.read_text())  # doctest: +ELLIPSIS
        [mechkit demo] loading attn-only-2l ...
        [mechkit demo] loaded in ... s (from cache: False)
        [mechkit demo] Model: ... s
        [mechkit demo] wrote .../index.html
        index.html True
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[mechkit demo] loading {model_name} ...", flush=True)
    model = load_model(model_name)
    info = model_info(model)
    print(f"[mechkit demo] loaded in {info.load_seconds:.1f} s (from cache: {info.from_cache})")
    missing = ""
    if sections is None:
        extra = registered_sections()
        sections = (*SECTIONS, *extra)
        if not extra:
            missing = (
                "The paper reproductions are not installed: no package registers demo sections "
                f"under the entry-point group {SECTION_GROUP!r}. They ship in mechkit's wheel as "
                "mechkit_circuits; in a checkout, run `pip install -e .` (or `make demo`) to "
                "register them."
            )
            print(f"[mechkit demo] {missing}", flush=True)
            missing = f"<p><b>{html.escape(missing)}</b></p>"
    body = []
    for title, section in sections:
        t0 = time.perf_counter()
        takes_quick = "quick" in inspect.signature(section).parameters
        content = section(model, out, quick=quick) if takes_quick else section(model, out)
        seconds = time.perf_counter() - t0
        print(f"[mechkit demo] {title}: {seconds:.1f} s", flush=True)
        body.append(f"<h2>{html.escape(title)}</h2>{content}<p><small>{seconds:.1f} s</small></p>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mechkit report: {html.escape(model_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
td{{white-space:pre-wrap}}</style></head><body>
<h1>mechkit report: {html.escape(model_name)}</h1>
{"<p><b>Quick run</b>: every section used fewer prompts and settings.</p>" if quick else ""}
{"".join(body)}{missing}
<p><small>Written by mechkit in {time.perf_counter() - start:.1f} s.</small></p>
</body></html>
"""
    index = out / "index.html"
    write_text_atomically(index, page)
    print(f"[mechkit demo] wrote {index}")
    return index
