"""`pipeline.py inspect REFS`: what a precompute output holds, before GPU hours go into training.

Prints the manifest summary (model, rows, rejects by reason), token-length and reference-margin
statistics and a few decoded pairs, and draws a histogram of reference log-prob margins
(ref_chosen_logps - ref_rejected_logps).

`--verify` only checks the files: every shard and rejects file against the manifest (size and
sha256 where the manifest has them), writing nothing; it prints OK or one line per bad file and
exits 1 on damage. Precompute runs the same check (`damaged_files`) on its finished shards before
each run, and scores a damaged shard again.
"""

from __future__ import annotations

import argparse
import os
import statistics

import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core import storage
from stages.core.plots import margin_histogram
from stages.core.shard_stream import Refs, iter_rows, load_refs


def _file_problem(root: str, path: str, size: int | None, sha256: str | None) -> str | None:
    """What is wrong with one file of a shard, or None: missing, another size, another checksum."""
    try:
        with storage.open_binary(storage.join(root, path)) as fh:
            h = storage.hash_stream(fh)
            n = fh.tell()  # read to the end: its size
    except FileNotFoundError:
        return f"{path}: missing"
    if size is not None and n != size:
        return f"{path}: {n} bytes, expected {size}"
    if sha256 is not None and h.hexdigest() != sha256:
        return f"{path}: sha256 {h.hexdigest()[:12]}... differs from the recorded {sha256[:12]}..."
    if sha256 is None:  # rejects files of older outputs have no checksum: they must at least be Parquet
        try:
            with storage.open_binary(storage.join(root, path)) as fh:
                pq.read_metadata(fh)
        except Exception as e:  # pyarrow raises several types for a damaged file
            return f"{path}: not readable Parquet ({type(e).__name__})"
    return None


def damaged_files(root: str, entry: dict) -> list[str]:
    """One line per file of a shard entry (its shard and rejects file) that does not match the
    entry; empty when both do."""
    checks = [(entry["path"], entry.get("bytes"), entry["sha256"])]
    if entry.get("rejects_path"):
        checks.append((entry["rejects_path"], None, entry.get("rejects_sha256")))
    return [p for p in (_file_problem(root, *check) for check in checks) if p]


def verify(root: str) -> int:
    """`inspect --verify`: check every file the manifest lists; 0 when all match, 1 otherwise."""
    refs = load_refs(root)
    shards = refs.manifest["shards"]
    bad = [problem for s in shards for problem in damaged_files(root, s)]
    for problem in bad:
        print(f"damaged: {problem}")
    if bad:
        print(f"refs: {root}: {len(bad)} damaged file(s); re-run the precompute that made it to repair them")
        return 1
    print(f"refs: {root}: OK, {len(shards)} shards and their rejects files match manifest.json")
    return 0


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"mean": statistics.fmean(values), "p50": pick(0.5), "p95": pick(0.95), "min": ordered[0],
            "max": ordered[-1]}


def collect(refs: Refs) -> dict:
    """Lengths and reference margins over all shards, a shard at a time: per pair only four numbers
    are kept (the prompt's token ids are reduced to their count as they are read)."""
    prompt, chosen, rejected, margins = [], [], [], []
    for url in refs.shard_urls():
        with storage.open_binary(url) as fh:
            t = pq.read_table(fh, columns=["prompt_ids", "chosen_scored_tokens", "rejected_scored_tokens",
                                           "ref_chosen_logps", "ref_rejected_logps"])
        prompt += pc.list_value_length(t.column("prompt_ids")).to_pylist()
        chosen += t.column("chosen_scored_tokens").to_pylist()
        rejected += t.column("rejected_scored_tokens").to_pylist()
        margins += pc.subtract(t.column("ref_chosen_logps"), t.column("ref_rejected_logps")).to_pylist()
    if not margins:
        return {"rows": 0}
    return {"rows": len(margins), "prompt_tokens": _stats(prompt), "chosen_tokens": _stats(chosen),
            "rejected_tokens": _stats(rejected), "ref_margin": _stats(margins),
            "ref_prefers_chosen": sum(m > 0 for m in margins) / len(margins), "margins": margins}


def collect_unpaired(refs: Refs) -> dict:
    """An unpaired output (KTO examples): lengths, the label balance, the reference's per-token log-prob
    of desirable and of undesirable completions, and how many examples have a KL completion."""
    prompt, completion, labels, per_token, with_kl = [], [], [], [], 0
    for url in refs.shard_urls():
        with storage.open_binary(url) as fh:
            t = pq.read_table(fh, columns=["prompt_ids", "completion_scored_tokens", "label", "ref_logps",
                                           "ref_kl_logps"])
        prompt += pc.list_value_length(t.column("prompt_ids")).to_pylist()
        completion += t.column("completion_scored_tokens").to_pylist()
        labels += t.column("label").to_pylist()
        per_token += pc.divide(t.column("ref_logps"), pc.cast(t.column("completion_scored_tokens"),
                                                                  "float64")).to_pylist()
        with_kl += len(t) - t.column("ref_kl_logps").null_count
    if not labels:
        return {"rows": 0}
    return {"rows": len(labels), "desirable": sum(labels), "undesirable": len(labels) - sum(labels),
            "with_kl": with_kl, "prompt_tokens": _stats(prompt), "completion_tokens": _stats(completion),
            "ref_logp_per_token_desirable": _stats([v for v, d in zip(per_token, labels) if d]),
            "ref_logp_per_token_undesirable": _stats([v for v, d in zip(per_token, labels) if not d])}


def report(refs: Refs, examples: int = 2) -> tuple[str, dict]:
    m = refs.manifest
    info = collect(refs) if refs.kind == "paired" else collect_unpaired(refs)
    lines = [f"refs: {refs.root}",
             f"  reference model: {m['reference_model']['name']} "
             f"(weights {m['reference_model']['weights_hash'][:12]}), "
             f"dtype {m['dtype']}",
             f"  data: {', '.join(m.get('data_sources') or [m['data_source']])}",
             f"  max_length {m['max_length']}, max_prompt_length {m['max_prompt_length']}, {m['truncation_mode']}",
             f"  rows read {m['rows_read']}, written {m['rows_written']}, rejected {m['rows_rejected']}, "
             f"{len(m['shards'])} shards",
             ]
    for reason, n in sorted(m["rejects_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    rejected {reason}: {n}")
    for key in ("prompt_tokens", "chosen_tokens", "rejected_tokens", "ref_margin"):
        s = info.get(key)
        if s:
            lines.append(f"  {key:<16} mean {s['mean']:9.2f}  p50 {s['p50']:9.2f}  p95 {s['p95']:9.2f}  "
                         f"min {s['min']:9.2f}  max {s['max']:9.2f}")
    if refs.kind == "unpaired" and info.get("rows"):
        lines.append(f"  unpaired examples (KTO): {info['desirable']} desirable, {info['undesirable']} undesirable; "
                     f"{info['with_kl']} with a KL completion ({m.get('kl_pairing', {}).get('scope', '?')} pairing, "
                     f"seed {m.get('kl_pairing', {}).get('seed', '?')})")
        for key in ("completion_tokens", "ref_logp_per_token_desirable", "ref_logp_per_token_undesirable"):
            st = info.get(key)
            if st:
                lines.append(f"  {key:<30} mean {st['mean']:9.3f}  p50 {st['p50']:9.3f}  min {st['min']:9.3f}  "
                             f"max {st['max']:9.3f}")
    elif info.get("rows"):
        lines.append(f"  the reference already prefers chosen in {info['ref_prefers_chosen']:.1%} of pairs")
    if examples:
        lines += _examples(refs, examples)
    return "\n".join(lines), info


def _examples(refs: Refs, n: int) -> list[str]:
    from stages.core.models import load_tokenizer, resolve_model

    try:
        tok = load_tokenizer(resolve_model(refs.manifest["reference_model"]["path"]))
    except Exception as e:  # the model folder may live elsewhere (another machine, a hub name offline)
        return [f"  (no decoded pairs: tokenizer not available here: {type(e).__name__})"]
    out, shown = [], 0
    for p in iter_rows(refs.shard_urls()[0], refs.kind) if refs.shard_urls() else []:
        cut = lambda ids: tok.decode(ids, skip_special_tokens=False)[-300:].replace("\n", "\\n")  # noqa: E731
        if refs.kind == "unpaired":
            out += [f"  --- example {p['pair_id'][:12]} ({'desirable' if p['label'] else 'undesirable'}, "
                    f"ref log-prob {p['ref_chosen_logps']:.2f})", f"    prompt     ...{cut(p['prompt_ids'])}",
                    f"    completion {cut(p['chosen_ids'])[:300]}"]
            shown += 1
            if shown == n:
                break
            continue
        out += [f"  --- pair {p['pair_id'][:12]} (ref margin {p['ref_chosen_logps'] - p['ref_rejected_logps']:+.2f})",
                f"    prompt  ...{cut(p['prompt_ids'])}", f"    chosen   {cut(p['chosen_ids'])[:300]}",
                f"    rejected {cut(p['rejected_ids'])[:300]}"]
        shown += 1
        if shown == n:
            break
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pipeline.py inspect", description=__doc__.splitlines()[0])
    ap.add_argument("refs", help="precompute output folder or URL")
    ap.add_argument("--output", help="folder for ref_margins.png (default: REFS when local)")
    ap.add_argument("--examples", type=int, default=2, help="decoded pairs to show")
    ap.add_argument("--verify", action="store_true",
                    help="only check every shard and rejects file against the manifest; write nothing")
    args = ap.parse_args(argv)
    if args.verify:
        return verify(args.refs)
    refs = load_refs(args.refs)
    text, info = report(refs, args.examples)
    print(text)
    out = args.output or (args.refs if storage.is_local(args.refs) else None)
    if out and info.get("margins"):
        os.makedirs(out, exist_ok=True)
        path = margin_histogram(info["margins"], os.path.join(out, "ref_margins.png"),
                                f"reference margins, {info['rows']} pairs ({refs.manifest['reference_model']['name']})")
        print(f"  histogram: {path}")
    return 0
