"""Writes an OCI image archive (the image-layout spec, as a tar) from
uncompressed layer tars, for `ctr images import` on a cluster that has no
registry. Used by scripts/check/e2e-k8s.sh.

Usage:
  oci.py OUT.tar NAME:TAG --entrypoint PATH [--env K=V ...] LAYER.tar...
  oci.py --layer OUT.tar SRC=DEST[:MODE] ...   (a layer of single files)
"""

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_layer(out, files):
    """A layer holding each SRC at DEST (parents created), owned by root,
    with a fixed mtime so the same inputs give the same digest."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        dirs = set()
        for spec in files:
            src, dest = spec.split("=", 1)
            mode = 0o755
            if ":" in dest:
                dest, m = dest.rsplit(":", 1)
                mode = int(m, 8)
            dest = dest.lstrip("/")
            parts = dest.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                    dirs.add(d)
            info = tarfile.TarInfo(dest)
            info.size = os.path.getsize(src)
            info.mode = mode
            with open(src, "rb") as f:
                tar.addfile(info, f)


def write_image(out, ref, entrypoint, env, layers):
    name, tag = ref.rsplit(":", 1)
    work = tempfile.mkdtemp()
    try:
        blobs = os.path.join(work, "blobs", "sha256")
        os.makedirs(blobs)

        def blob(data=None, path=None):
            if path is not None:
                digest, size = sha256_file(path), os.path.getsize(path)
                shutil.copyfile(path, os.path.join(blobs, digest))
            else:
                digest, size = hashlib.sha256(data).hexdigest(), len(data)
                with open(os.path.join(blobs, digest), "wb") as f:
                    f.write(data)
            return digest, size

        layer_descs = []
        for layer in layers:
            digest, size = blob(path=layer)
            layer_descs.append(
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{digest}", "size": size}
            )
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": [entrypoint],
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + env,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descs]},
        }
        cdigest, csize = blob(json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{cdigest}", "size": csize},
            "layers": layer_descs,
        }
        mdigest, msize = blob(json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": f"sha256:{mdigest}",
                    "size": msize,
                    "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
                }
            ],
        }
        with open(os.path.join(work, "index.json"), "w") as f:
            json.dump(index, f)
        with open(os.path.join(work, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        with tarfile.open(out, "w") as tar:
            for entry in ("oci-layout", "index.json", "blobs"):
                tar.add(os.path.join(work, entry), arcname=entry)
    finally:
        shutil.rmtree(work)
    print(f"oci.py: {out} ({name}:{tag})")


def main(argv):
    if argv and argv[0] == "--layer":
        write_layer(argv[1], argv[2:])
        return 0
    out, ref = argv[0], argv[1]
    rest = argv[2:]
    entrypoint, env, layers = None, [], []
    while rest:
        a = rest.pop(0)
        if a == "--entrypoint":
            entrypoint = rest.pop(0)
        elif a == "--env":
            env.append(rest.pop(0))
        else:
            layers.append(a)
    if not entrypoint or not layers:
        print(__doc__, file=sys.stderr)
        return 2
    write_image(out, ref, entrypoint, env, layers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
