"""`pipeline.py inspect REFS`: what a precompute output holds, before GPU hours go into training.

Prints the manifest summary (model, rows, rejects by reason), token-length and reference-margin
statistics and a few decoded pairs, and draws a histogram of reference log-prob margins
(ref_chosen_logps - ref_rejected_logps).

Before any statistics, plain `inspect` compares every shard and rejects file with the manifest by
listing its folders (no file is read): a file that is missing or of another size than recorded is a
`warning:` line naming it (stderr, the console channel), no statistics are drawn from the damaged
output, and the exit code is 2; `--verify` then checks every file in full.

`--verify` only checks the files: every shard and rejects file against the manifest (size and
sha256 where the manifest has them), writing nothing; it prints OK or one line per bad file and
exits 1 on damage. Precompute runs the same check (`damaged_files`) on its finished shards before
each run, and scores a damaged shard again.
"""

from __future__ import annotations

import os
import statistics

import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core import console, storage
from stages.core.config.engine import Parser, with_default
from stages.core.config.options import parse_storage_options
from stages.core.plots import margin_histogram
from stages.core.refs.manifest import ShardEntry
from stages.core.refs.output import damaged_files
from stages.core.refs.stream import Refs, ShardError, iter_rows, load_refs


def verify(root: str) -> int:
    """`inspect --verify`: check every file the manifest lists; 0 when all match, 1 otherwise."""
    refs = load_refs(root)
    shards = refs.manifest.shards
    bad = [problem for s in shards for problem in damaged_files(root, s)]
    for problem in bad:
        print(f"damaged: {problem}")
    if bad:
        print(f"refs: {root}: {len(bad)} damaged file(s); re-run the precompute that made it to repair them")
        return 1
    print(f"refs: {root}: OK, {len(shards)} shards and their rejects files match manifest.json")
    return 0


def size_problems(root: str, shards: tuple[ShardEntry, ...]) -> list[str]:
    """Plain `inspect`'s check, as cheap as a listing: one line per shard or rejects file that is missing
    or whose size differs from the manifest's (sizes where recorded; older outputs record none)."""
    listed: dict[str, int] = {}
    for folder in {p.rsplit("/", 1)[0] for s in shards for p in (s.path, s.rejects_path) if p}:
        listed.update(_sizes(root, folder))
    problems = []
    for s in shards:
        for path, size in ((s.path, s.bytes), (s.rejects_path, s.rejects_bytes)):
            if path and path not in listed:
                problems.append(f"{path}: missing")
            elif path and size is not None and listed[path] != size:
                problems.append(f"{path}: {listed[path]} bytes, the manifest records {size}")
    return problems


def _sizes(root: str, folder: str) -> dict[str, int]:
    """{'folder/name': size} of the files directly in one folder of an output ({} when it is not there)."""
    url = storage.join(root, folder)
    fs, path = storage.filesystem(url)
    try:
        entries = storage.retrying(url, fs.ls, path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {f"{folder}/{os.path.basename(e['name'].rstrip('/'))}": e["size"] for e in entries
            if e.get("type") == "file"}


def _read_shard(root: str, url: str, columns: list[str]):
    """A shard's columns; a file that does not read (damaged in a way its size does not show) is one line."""
    try:
        with storage.open_binary(url) as fh:
            return pq.read_table(fh, columns=columns)
    except FileNotFoundError:
        raise ShardError(f"shard missing: {url} (listed in the manifest)") from None
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ShardError(f"shard {url} could not be read ({type(e).__name__}); `pipeline.py inspect {root} "
                         "--verify` checks every file") from None


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
        t = _read_shard(refs.root, url, ["prompt_ids", "chosen_scored_tokens", "rejected_scored_tokens",
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
        t = _read_shard(refs.root, url, ["prompt_ids", "completion_scored_tokens", "label", "ref_logps",
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
    m, model = refs.manifest, refs.manifest.reference_model
    info = collect(refs) if refs.kind == "paired" else collect_unpaired(refs)
    lines = [f"refs: {refs.root}",
             f"  reference model: {model.name} (weights {model.weights_hash[:12]}), dtype {m.dtype}",
             f"  data: {', '.join(m.sources)}",
             f"  max_length {m.truncation.max_length}, max_prompt_length {m.truncation.max_prompt_length}, "
             f"{m.truncation.mode}",
             f"  rows read {m.rows_read}, written {m.rows_written}, rejected {m.rows_rejected}, "
             f"{len(m.shards)} shards",
             ]
    for reason, n in sorted(m.rejects_by_reason.items(), key=lambda kv: -kv[1]):
        lines.append(f"    rejected {reason}: {n}")
    for key in ("prompt_tokens", "chosen_tokens", "rejected_tokens", "ref_margin"):
        s = info.get(key)
        if s:
            lines.append(f"  {key:<16} mean {s['mean']:9.2f}  p50 {s['p50']:9.2f}  p95 {s['p95']:9.2f}  "
                         f"min {s['min']:9.2f}  max {s['max']:9.2f}")
    pairing = m.kl_pairing or {}
    if refs.kind == "unpaired" and info.get("rows"):
        lines.append(f"  unpaired examples (KTO): {info['desirable']} desirable, {info['undesirable']} undesirable; "
                     f"{info['with_kl']} with a KL completion ({pairing.get('scope', '?')} pairing, "
                     f"seed {pairing.get('seed', '?')})")
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
    from stages.core.runtime.models import load_tokenizer, resolve_model

    try:
        tok = load_tokenizer(resolve_model(refs.manifest.reference_model.path))
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


def parser() -> Parser:
    ap = Parser(prog="pipeline.py inspect", description=__doc__.splitlines()[0])
    ap.add_argument("refs", help="precompute output folder or URL")
    ap.add_argument("--output", metavar="FOLDER", help="local folder for ref_margins.png (default: REFS when local)")
    ap.add_argument("--examples", type=int, default=2, metavar="N", help=with_default("decoded pairs to show", 2))
    ap.add_argument("--verify", action="store_true",
                    help="only check every shard and rejects file against the manifest (sizes and checksums); "
                         "write nothing (default: off)")
    ap.add_argument("--storage-options", metavar="JSON",
                    help=with_default("JSON of fsspec options (endpoint, profile, ...) for an fsspec URL", None))
    return ap


def main(argv: list[str]) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.examples < 0:
        ap.error(f"--examples: must be 0 or more, got {args.examples}")
    if args.output and not storage.is_local(args.output):  # the histogram is drawn by matplotlib, on this machine
        ap.error(f"--output {args.output}: ref_margins.png is drawn here; give a local folder")
    storage.configure(parse_storage_options(args.storage_options))
    if args.verify:
        return verify(args.refs)
    refs = load_refs(args.refs)
    problems = size_problems(args.refs, refs.manifest.shards)
    if problems:
        return _warn_damaged(args.refs, problems)
    text, info = report(refs, args.examples)
    print(text)
    out = args.output or (args.refs if storage.is_local(args.refs) else None)
    if out and info.get("margins"):
        os.makedirs(out, exist_ok=True)
        path = margin_histogram(info["margins"], os.path.join(out, "ref_margins.png"),
                                f"reference margins, {info['rows']} pairs ({refs.manifest.reference_model.name})")
        print(f"  histogram: {path}")
    return 0


def _warn_damaged(root: str, problems: list[str]) -> int:
    """Statistics of a damaged output would mislead: name the files, point at the full check, exit 2."""
    for problem in problems:
        console.warn(problem)
    console.say("refs", f"{root}: {len(problems)} file(s) differ from manifest.json, so no statistics are shown; "
                f"`pipeline.py inspect {root} --verify` checks every file in full, and re-running the precompute "
                "that made it repairs them")
    return 2
