"""The privacy statement of a run (RUN_DIR/privacy.md and metrics.json["privacy"]): what the settings protect,
what they do not, in words a user can act on.

Formal part (Feyisetan et al. 2020; DESIGN's accounting): d_chi noise at k = 0 is metric DP over the embedding
distance, P[M(x) in S] <= exp(eta d(x, x')) P[M(x') in S] per token (epsilon = eta per unit of distance; this
project does not divide by the dimension). E fresh draws of the same example compose to E eta; a keyed draw
repeated costs nothing more. At k >= 1 the bottom's output is not norm-bounded, so no per-token bound holds.
"""

from __future__ import annotations

import math

import torch

from sap_common.models.families import ENCODER
from sap_common.models.split import BottomModel

LABELS_EXPOSED = (
    "every training label is readable by the provider: the gradient the client returns, "
    "dL/dlogits = (softmax - onehot(label)) / B, has exactly one negative entry, the label's "
    "(measured: `sap-client audit --recorded` reads 100% of them, on the tiny test models and on 1,000 real movie "
    "snippets with SmolLM2-135M and MiniLM; README, Label privacy)"
)
LABELS_EXPOSED_PRIVATE_HEAD = (
    "every training label of a two-class task is readable by the provider, although the head stays here "
    "(--private-head): the gradient the client returns, dL/dpooled = (p - y)(w_1 - w_0) / B, lies on one line "
    "per step and its side is the label (Li et al., ICLR 2022); tracking that line from step to step and "
    "resolving the one flip with the class prior reads them all (measured: `sap-client audit --recorded` "
    "reads 100%, on the tiny test models and on 1,000 real movie snippets with SmolLM2-135M and MiniLM; README, "
    "Label privacy). What it does hide: the logits, dL/dlogits and the number of classes"
)
LABELS_EXPOSED_USER_TAIL = (
    "the training labels are readable by the provider, although the head and the last {tail} block(s) stay here "
    "(--user-tail {tail}): the gradient the client returns is dL/dh below those blocks, one row per real token; "
    "each example's is bent by its own pass through the tail, so the rows no longer lie on one line, but the "
    "residual path keeps the gradients of one label pointing alike, and clustering them (named by the class prior "
    "or by one example whose label the provider knows; over several epochs each example's gradients linked by "
    "the identical vectors it sent) reads them (measured: `sap-client audit --recorded` reads 99.8% to 100% over "
    "10 epochs on the tiny test models and 100% on 1,000 real movie snippets with SmolLM2-135M and MiniLM at "
    "--user-tail 1; README, Label privacy). What it does hide: the logits, dL/dlogits, the number of "
    "classes and the last block(s)' output"
)
TARGETS_EXPOSED_GENERATIVE = (
    "generative fine-tuning: the targets are the completion (or assistant) tokens, and they leave this machine "
    "twice. As hidden states: every real token is sent, prompt and completion (see what was sent). And in the "
    "gradient the client returns, dL/dh of the provider's last block's output at every token: it carries "
    "diag(gamma) E^T (p - onehot(target)) through the pretrained final norm and tied output layer the provider "
    "knows, and the vocabulary token with the lowest <E_v, gamma * dL/dh> is the target (measured: 72% of 1,189 "
    "reply tokens on SmolLM2-135M at split 6, with or without --user-tail 1 or noise, a lower bound; README, "
    "Generative fine-tuning). Treat every target token as exposed. What it does hide: the logits and "
    "dL/dlogits (vocabulary-sized, never sent)"
)
NOT_COVERED = (
    "the number of tokens of every text (what is sent has one vector per real token), the number of "
    "examples, classes and steps, batch composition, and the timing of every request"
)


@torch.no_grad()
def median_token_distance(bottom: BottomModel, *, sample: int = 2000, seed: int = 0) -> float:
    """The median L2 distance between two different tokens' k = 0 outputs (a decoder's embedding rows; an
    encoder's embedding-layer outputs at position 1), over a seeded sample of the vocabulary."""
    table = bottom.input_embedding_matrix().detach()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(table.shape[0], generator=generator)[:sample]
    if bottom.family is ENCODER:
        was_training = bottom.training
        bottom.eval()
        rows = bottom.embeddings(input_ids=ids.unsqueeze(1), cache_length=1)[:, 0]  # (n, H)
        bottom.train(was_training)
    else:
        rows = table[ids]
    distances = torch.cdist(rows.float(), rows.float())
    upper = distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)]
    return float(upper.median())


def observations_per_example(noise_observations: str, epochs: int) -> tuple[int, str]:
    """(noisy copies of one training example the provider gets, why), from metrics' noise_observations."""
    if noise_observations == "fresh noise every epoch":
        return epochs, f"a fresh noise draw in each of the {epochs} epochs"
    if noise_observations == "one per step (trainable bottom)":
        return epochs, (
            f"one per epoch ({epochs}), each a differently trained bottom's output under the same noise draw: "
            f"averaging them removes none of the noise, but two of them differ by B_e(x) - B_e'(x), the noise "
            f"cancelled, which no noise bound covers (an attack on that difference is not in the audit)"
        )
    return 1, "one: the noise is drawn once per example and re-sent unchanged every epoch"


def privacy_statement(
    *,
    model: str,
    split: int,
    eta: float | None,
    eta_max: float | None,
    cti: str | None,
    rescale_norm: float | None,
    noise_observations: str,
    epochs: int,
    median_distance: float,
    audit: dict | None = None,
    private_head: bool = False,
    label_dp: dict | None = None,
    user_tail: int = 0,
    generative: bool = False,
    start_adapter: str = "",
    bottom_learning_rate: float | None = None,
    learned_filter: dict | None = None,
) -> dict:
    """The statement as data (metrics.json["privacy"]); render_statement turns it into privacy.md."""
    statement: dict = {
        "model": model,
        "split": split,
        "mechanism": "d_chi noise" if eta else "none",
        "eta": eta,
        "eta_max": eta_max,
        "cti": cti,
        "rescale_norm": rescale_norm,
        "label_exposure": TARGETS_EXPOSED_GENERATIVE
        if generative
        else _label_exposure(private_head, label_dp, user_tail),
        "private_head": private_head,
        "user_tail": user_tail,
        "task": "generative" if generative else "classification",
        "label_dp": label_dp,
        "start_adapter": start_adapter or None,
        "trained_bottom": None if bottom_learning_rate is None else {"learning_rate": bottom_learning_rate},
        "learned_filter": learned_filter,
        "not_covered": NOT_COVERED,
        "median_token_distance": median_distance,
        "predict_queries": "the same text always gets the same noise (keyed by RUN_DIR/noise.key), so "
        "repeating a query tells the provider nothing new; every different text "
        "is a new observation of that text only",
    }
    copies, why = observations_per_example(noise_observations, epochs)
    statement.update(observations=copies, observations_why=why)
    if not eta:
        statement["formal"] = (
            "no noise: the provider receives the bottom's hidden states as they are; a small model's "
            "split alone protects almost nothing (the audit recovers nearly every token)"
        )
    elif split == 0 and noise_observations == "one per step (trainable bottom)":
        statement["formal"] = (
            "no formal per-token guarantee for the run: each epoch's embedding outputs, moved by training, went out "
            "with the same noise draw, so the difference of two epochs' sendings is a function of the text with no "
            "noise in it; the d_chi bound holds for one sending alone"
        )
    elif split == 0:
        strongest = eta_max if eta_max is not None else eta
        epsilon = strongest * median_distance * copies
        statement.update(epsilon_per_unit_distance=strongest * copies, epsilon_median_pair=epsilon)
        statement["formal"] = (
            f"metric DP per token: for any two tokens x, x' and anything S the provider could conclude, "
            f"P[sent in S | x] <= exp({strongest * copies:.4g} x d(x, x')) P[sent in S | x'], d the L2 distance of "
            f"their embedding-layer outputs (epsilon = eta = {strongest:.4g} per unit of distance"
            + (", the largest per-token eta CTI gives" if eta_max is not None and cti else "")
            + (f", times {copies} observations" if copies > 1 else "")
            + f"). Two tokens at this model's median distance ({median_distance:.3g}) get epsilon = {epsilon:.3g}: "
            + _epsilon_words(epsilon)
        )
    else:
        statement["formal"] = (
            f"no formal per-token guarantee: at k = {split} the noise is added to the output of {split} blocks, "
            f"which is not bounded in norm (no clipping), so two different texts' hidden states can be arbitrarily "
            f"far apart and d_chi noise bounds nothing about the tokens; only the audit's attacks measure what leaks"
        )
    if cti == "exempt":
        statement["formal"] += (
            "; CTI's exempt mode sends the chosen task-critical tokens without any noise: they are not protected at all"
        )
    if audit:
        statement["audit"] = audit
    return statement


def _label_exposure(private_head: bool, label_dp: dict | None, user_tail: int = 0) -> str:
    if user_tail:
        exposed = LABELS_EXPOSED_USER_TAIL.format(tail=user_tail)
    else:
        exposed = LABELS_EXPOSED_PRIVATE_HEAD if private_head else LABELS_EXPOSED
    if not label_dp:
        return exposed
    keep = label_dp["keep_probability"]
    return (
        f"label differential privacy, epsilon = {label_dp['epsilon']:g} ({label_dp['mechanism']}): every training "
        f"label was replaced once, before training, by its randomized response (kept with probability {keep:.3f}; "
        f"{label_dp['flipped']} of {label_dp['examples']} changed), so for any two labels the chance of anything "
        f"the provider sees changes by at most a factor e^{label_dp['epsilon']:g}"
        + (
            " (for a prior treated as public: RR-with-prior's prior is the training split's class frequencies)"
            if label_dp["mechanism"] == "rr-prior"
            else ""
        )
        + ". The provider can still read the label training used from the gradients "
        + (
            "(clustering dL/dh below the user's tail)"
            if user_tail
            else "(tracked direction scoring on dL/dpooled)"
            if private_head
            else "(the sign rule on dL/dlogits)"
        )
        + f", but that is the randomized label: the true one with probability {keep:.3f}, which the audit's label "
        "inference measures against the true labels. Not protected: what the text itself says about its label; "
        "a provider that classifies the hidden states it receives starts from about the task's accuracy, and label "
        "DP only bounds how far the gradients move it from there (posterior odds at most e^epsilon times the prior "
        "odds)"
    )


def _epsilon_words(epsilon: float) -> str:
    if epsilon <= 1:
        return "an observer's odds of telling the two apart change by at most a factor of e^epsilon <= 2.7."
    if epsilon <= 10:
        return (
            f"their odds may change by a factor of up to e^{epsilon:.3g} = {math.exp(epsilon):.3g}: a weak bound; "
            f"read the audit's figures."
        )
    return (
        "the bound is far too loose to mean anything (odds may change by more than e^10): only the audit says "
        "how much leaks."
    )


def audit_summary(report: dict) -> dict:
    """The audit figures a statement quotes (from report.json)."""
    keys = (
        "source",
        "attack",
        "eia_token_recovery",
        "eia_token_recovery_content",
        "eia_privacy",
        "eia_tokens",
        "examples",
        "aia_accuracy",
        "aia_baseline",
        "label_inference_accuracy",
        "label_inference_baseline",
        "label_attack",
        "targets_read",
        "target_tokens",
    )
    summary = {key: report[key] for key in keys if key in report}
    summary["eia_attacks"] = {kind: figures["recovery"] for kind, figures in report.get("eia_attacks", {}).items()}
    return summary


START_ADAPTER_LINE = (
    "- **Defence: the provider's noise-robust starting adapter `{name}`** (--start-adapter): the top's PEFT weights "
    "started from an adapter the provider trained on its own public text to undo this noise. It changes what the "
    "provider's top does with what it receives, not what is sent: the privacy is that of the d_chi noise above at "
    "the same eta, no more and no less."
)


TRAINED_BOTTOM_LINE = (
    "- **Defence: a trainable bottom** (--train-bottom, learning rate {lr:g}): the bottom's weights moved away from "
    "the pretrained ones the provider knows, so the attacks that invert what was sent through the pretrained bottom "
    "lose ground as training goes on (measured: README, the trainable bottom). It is no guarantee: the first steps "
    "were sent through a bottom still close to the pretrained one, and the bottom's drift, not a bound, is what "
    "protects."
)


LEARNED_FILTER_LINE = (
    "- **Defence: a learned filter** (--learned-filter, {steps} steps, privacy weight {weight:g}): before the first "
    "step this machine trained a map between the bottom and the noise, on the training texts, to keep what a local "
    "task head needed and lose what a local inversion model read ({read:.0%} of tokens read by it at the end of its "
    "training); what was sent is filter(h) + noise, at the noise calibration of h (the filter keeps each vector's "
    "norm). The audit assumes the provider knows the filter's weights; its attacks that invert through the "
    "pretrained bottom alone do not use them."
)


def render_statement(statement: dict) -> str:
    """privacy.md: plain words, the formal part, what is exposed, what is not covered, the audit if any."""
    lines = [
        "# Privacy statement of this run",
        "",
        f"- **What was sent**: the output of the first {statement['split']} blocks of {statement['model']} "
        f"(k = {statement['split']}) for every real token, "
        + (f"perturbed with d_chi noise, eta = {statement['eta']:.4g}" if statement["eta"] else "without noise")
        + (
            f", CTI {statement['cti']} mode (largest per-token eta {statement['eta_max']:.4g})"
            if statement["cti"] and statement.get("eta_max")
            else ""
        )
        + (f", noised vectors rescaled to norm {statement['rescale_norm']:.4g}" if statement["rescale_norm"] else "")
        + ".",
        f"- **Formal guarantee**: {statement['formal'].rstrip('.')}.",
        *([START_ADAPTER_LINE.format(name=statement["start_adapter"])] if statement.get("start_adapter") else []),
        *(
            [TRAINED_BOTTOM_LINE.format(lr=statement["trained_bottom"]["learning_rate"])]
            if statement.get("trained_bottom")
            else []
        ),
        *(
            [
                LEARNED_FILTER_LINE.format(
                    steps=statement["learned_filter"]["steps"],
                    weight=statement["learned_filter"]["privacy_weight"],
                    read=statement["learned_filter"]["local_inversion_token_accuracy"],
                )
            ]
            if statement.get("learned_filter")
            else []
        ),
        f"- **Noisy observations of each training example the provider got**: {statement['observations_why']}.",
        f"- **Prediction queries**: {statement['predict_queries']}.",
        f"- **Labels**: {statement['label_exposure']}.",
        f"- **Not covered by any of this**: {statement['not_covered']}.",
        "",
    ]
    generative = statement.get("task") == "generative"
    if generative:  # prediction queries are classification's; the targets take the labels' place
        queries = next(i for i, line in enumerate(lines) if line.startswith("- **Prediction queries**"))
        lines[queries : queries + 2] = [
            "- **Generation** (`sap-client generate`): every prompt token's vector and every generated token's vector "
            "is sent, through the same noise; a repeated prompt is sent as exactly the same vectors (its noise is "
            "keyed by the run's secret and the tokens so far).",
            f"- **Targets**: {statement['label_exposure']}.",
        ]
    audit = statement.get("audit")
    if audit:
        content = audit.get("eia_token_recovery_content")  # NaN where the texts had no content word
        lines += [
            "## Audit of these settings",
            "",
            f"`sap-client audit` ({audit.get('source')}): the strongest attack ({audit['attack']}) recovered "
            f"{audit['eia_token_recovery']:.1%} of {audit['eia_tokens']} tokens"
            + (f" and {content:.1%} of content words" if isinstance(content, float) and not math.isnan(content) else "")
            + f" (empirical privacy {audit['eia_privacy']:.3f}); every attack: "
            + ", ".join(f"{k} {v:.1%}" for k, v in audit["eia_attacks"].items())
            + ".",
        ]
        if "label_inference_accuracy" in audit:
            lines.append(
                f"Labels read from the recorded gradients: {audit['label_inference_accuracy']:.1%} "
                f"(majority baseline {audit['label_inference_baseline']:.1%}"
                + (f"; attack: {audit['label_attack']}" if audit.get("label_attack") else "")
                + ")."
            )
        if "aia_accuracy" in audit:
            lines.append(f"Attribute inference: {audit['aia_accuracy']:.3f} (baseline {audit['aia_baseline']:.3f}).")
        if "targets_read" in audit:
            lines.append(
                f"Target tokens read from the recorded gradients: {audit['targets_read']:.1%} of "
                f"{audit['target_tokens']}."
            )
        lines.append("")
    else:
        data = "DATA.jsonl" if generative else "DATA.csv"
        lines += [
            f"No audit has been run for these settings yet: `sap-client audit {data} --run RUN_DIR --out "
            "REPORT_DIR` measures what the strongest attacks recover and adds it here"
            + (" (with `--recorded DIR`, a `sap-server --record` recording, also the targets)." if generative else "."),
            "",
        ]
    return "\n".join(lines)
