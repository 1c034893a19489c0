"""Put serve_config.yaml into deploy/kuberay/rayservice.yaml's serveConfigV2, verbatim.

python3 scripts/render_rayservice.py      (tests/unit/test_deploy_files.py checks they match)
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
manifest = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
text = manifest.read_text()
head, rest = text.split("  serveConfigV2: |\n", 1)
tail = rest[rest.index("  rayClusterConfig:") :]
body = "\n".join(("    " + line) if line else "" for line in (ROOT / "serve_config.yaml").read_text().splitlines())
manifest.write_text(f"{head}  serveConfigV2: |\n{body}\n{tail}")
print(f"wrote {manifest}")
