"""README and docs/ hold together: every relative link and #anchor resolves (GitHub's heading anchors),
and the README stays a short guide whose reference lives in docs/ (issue 23)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> str:
    """The page without fenced code blocks (their brackets are code, not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces → '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.replace("*", "").strip().lower()
    keep = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in " -" or cat[0] in "LN" or ch == "_":
            keep.append(ch)
    return "".join(keep).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [a or b for a, b in LINK.findall(prose(page.read_text(encoding="utf-8")))]


def test_slug_follows_githubs_rule():
    assert slug("Quickstart (CPU, about 5 minutes on 2 cores)") == "quickstart-cpu-about-5-minutes-on-2-cores"
    assert slug("`ddaepp probe RUN_OR_CKPT`") == "ddaepp-probe-run_or_ckpt"
    assert slug("Latent space: DiT, latent RF with CFG, SRA, `profile-layers`") == \
        "latent-space-dit-latent-rf-with-cfg-sra-profile-layers"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_every_docs_page_is_reachable_from_the_readme():
    readme = links(ROOT / "README.md")
    named = {Path(t.partition("#")[0]).name for t in readme if t.partition("#")[0].startswith("docs/")}
    missing = [p.name for p in PAGES[1:] if p.name not in named]
    assert not missing, f"docs pages the README's table of contents does not link: {missing}"


# ------------------------------------------------------------------------------------------------
# The README stays a short guide, and its commands are the ones that run
# ------------------------------------------------------------------------------------------------

README = ROOT / "README.md"

# Every "## " section of the README before it moved to docs/ (issue 23): each still has a heading somewhere.
OLD_README_SECTIONS = [
    "Set up",
    "Quickstart (CPU, about 5 minutes on 2 cores)",
    "Commands",
    "Models, formulations, samplers",
    "Recipes",
    "Generation quality and dense probing: `fid`, `segprobe`",
    "Latent space: DiT, latent RF with CFG, SRA, `profile-layers`",
    "Released checkpoints: `ddaepp import`",
    "ImageNet evaluation of latent (DiT) runs: Table 4, Table 5, Fig. 5, Fig. 7",
    "Representation analysis: `probe`, `cka`, `align`, `noisy-classifier`",
    "Multi-GPU and multi-node",
    "Offline use: where data and weights go",
    "Exit codes",
    "Benchmarks",
    "Status",
    "Architecture",
    "Development",
]


def headings(page: Path) -> list[str]:
    return [m.group(2) for m in (re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
                                 for line in prose(page.read_text(encoding="utf-8")).splitlines()) if m]


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(info string, lines) of every fenced code block."""
    out, cur, info = [], None, ""
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if m and cur is None:
            cur, info = [], line.strip()[3:].strip()
        elif m:
            out.append((info, cur))
            cur = None
        elif cur is not None:
            cur.append(line)
    return out


def section(text: str, title_prefix: str) -> str:
    """The text of the README's "## <title…>" section (up to the next "## ")."""
    parts = re.split(r"^## ", prose_keeping_fences(text), flags=re.M)
    found = [p for p in parts if p.startswith(title_prefix)]
    assert len(found) == 1, f"one '## {title_prefix}…' section expected, found {len(found)}"
    return found[0]


def prose_keeping_fences(text: str) -> str:
    """The page with '#' at the start of lines inside code blocks escaped, so splitting on headings
    never cuts a block at a shell comment."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        out.append("\\" + line if fenced and line.startswith("#") else line)
    return "\n".join(out)


def commands(lines: list[str]) -> list[str]:
    """Shell commands of a block: comments dropped, continuation lines joined, blank lines skipped."""
    joined, cur = [], ""
    for line in lines:
        line = re.sub(r"\s+#\s.*$", "", line.rstrip()).rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1].strip() + " "
            continue
        joined.append(" ".join((cur + line.strip()).split()))
        cur = ""
    return joined


def quickstart_commands() -> list[str]:
    blocks = [b for info, b in fenced_blocks(section(README.read_text(encoding="utf-8"), "Quickstart"))
              if info in ("bash", "sh", "shell")]
    assert blocks, "the README's Quickstart has no bash block"
    return commands(blocks[0])


def test_readme_stays_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 260, f"README.md has {n} lines; move reference material to docs/ (≤ 260)"


def test_every_old_readme_section_still_has_a_heading():
    have = {h for page in PAGES for h in headings(page)}
    missing = [t for t in OLD_README_SECTIONS if t not in have]
    assert not missing, f"sections of the README that no page has a heading for any more: {missing}"


def test_readme_has_the_guide_sections():
    have = headings(README)
    for title in ("Set up", "What next", "Reproduce a paper result", "Documentation"):
        assert title in have, title
    assert any(h.startswith("Quickstart") for h in have)


def test_quickstart_block_is_what_pixi_runs():
    """`pixi run quickstart` runs the README's commands, adding only what the README says it adds:
    `--force` on `sample`, and `--run-dir runs/quickstart`, which is the recipe's own run folder."""
    import tomllib

    readme = quickstart_commands()
    assert [c.split()[:2] for c in readme] == [["ddaepp", "train"], ["ddaepp", "sample"]], readme
    task = tomllib.loads((ROOT / "pixi.toml").read_text())["tasks"]["quickstart"]
    pixi = [" ".join(c.split()) for c in task.split("&&")]
    recipe = yaml_name(ROOT / readme[0].split()[2])
    assert recipe == "quickstart"  # so runs/quickstart is the default run folder
    stripped = [re.sub(r" --force\b| --run-dir runs/quickstart\b", "", c) for c in pixi]
    assert stripped == readme, f"pixi.toml's quickstart task {pixi} is not the README's block {readme}"
    assert "adding `--force`" in section(README.read_text(encoding="utf-8"), "Quickstart")


def yaml_name(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))["name"]


@pytest.mark.slow
def test_the_readme_quickstart_block_runs_as_shown(tmp_path):
    """The README's own quickstart commands, run in a fresh folder (training cut to 3 steps), write what
    the README says and print lines of the form of its expected output."""
    import os
    import subprocess
    import sys

    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    printed = []
    for cmd in quickstart_commands():
        argv = cmd.split()[1:] + (["--max-steps", "3"] if cmd.split()[1] == "train" else [])
        r = subprocess.run([sys.executable, "-m", "ddaepp_cli", *argv], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=600)
        assert r.returncode == 0, f"{cmd}: {r.stderr[-2000:]}"
        printed += (r.stdout + r.stderr).splitlines()
    final = tmp_path / "runs" / "quickstart" / "final"
    assert (final / "grid.png").is_file() and len(list(final.glob("0000*.png"))) == 64
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "step-0000003").is_dir()
    expected = [b for info, b in fenced_blocks(section(README.read_text(encoding="utf-8"), "Quickstart"))
                if info == ""][0]
    for line in expected:  # the README's numbers are of the full run; the form must match
        if line.startswith(("trained to step", "wrote ")):
            pattern = re.escape(line)
            pattern = re.sub(r"\d+", r"\\d+", pattern)
            assert any(re.fullmatch(pattern, p.strip()) for p in printed), f"no line like {line!r} in {printed}"


def test_commands_in_readme_and_docs_exist_with_their_options():
    """Every `ddaepp CMD --option` shown in a code block is a command with that option."""
    import typer

    from ddaepp_cli.cli import app

    group = typer.main.get_command(app)
    bad = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        blocks = [b for info, b in fenced_blocks(text) if info in ("bash", "sh", "shell", "")]
        blocks.append([line[4:] for line in prose(text).splitlines() if line.startswith("    ddaepp ")])
        for cmd in (c for b in blocks for c in commands(b)):
            for part in re.split(r"&&|\|", cmd):
                words = part.split()
                if "ddaepp_cli" in words:  # accelerate launch … -m ddaepp_cli CMD / torchrun … -m ddaepp_cli
                    words = words[words.index("ddaepp_cli"):]
                elif not words or words[0] != "ddaepp":
                    continue
                if len(words) < 2 or words[1].startswith("-"):
                    continue
                sub = group.commands.get(words[1])
                if sub is None:
                    bad.append(f"{page.name}: `{part.strip()}`: no command {words[1]!r}")
                    continue
                known = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
                for w in words[2:]:
                    if w in (">", "2>"):
                        break
                    opt = w.split("=", 1)[0]
                    if opt.startswith("--") and opt not in known:
                        bad.append(f"{page.name}: `{part.strip()}`: {words[1]} has no option {opt}")
    assert not bad, "\n".join(bad)
