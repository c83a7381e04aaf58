"""Checks the relative links of README.md and docs/*.md: every file exists, every
#anchor names a heading of its page.  Run by .ci/run."""
import re, os, sys
def slug(h):
    h = h.strip().lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")
bad = 0
files = ["README.md"] + ["docs/" + f for f in os.listdir("docs") if f.endswith(".md")]
for f in files:
    text = open(f).read()
    nofence = re.sub(r"```.*?```", "", text, flags=re.S)
    for m in re.finditer(r"\]\(([^)\s]+)\)", nofence):
        target = m.group(1)
        if target.startswith("http"): continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(f), path)) if path else f
        if not os.path.exists(full):
            print(f"{f}: missing {target}"); bad += 1; continue
        if anchor and full.endswith(".md"):
            heads = [slug(h) for h in re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", open(full).read(), flags=re.S), re.M)]
            if anchor not in heads:
                print(f"{f}: no anchor {target} in {heads}"); bad += 1
print("links checked:", len(files), "files;", bad, "bad")
sys.exit(bool(bad))
