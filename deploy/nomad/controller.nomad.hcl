# filevol on Nomad: the controller plugin (this file) and the node
# plugin system job (node.nomad.hcl).
# Nomad speaks CSI over its own plugin socket (`csi_plugin` blocks below),
# so no Kubernetes sidecars are needed. The pool here is a host directory
# (/var/lib/filevol); for a shared pool, mount the share on every client and
# point both jobs' --pool at a directory on it, with --topology="". The
# share must carry locks to its server (NFS without nolock and without
# local_lock=all|posix, CephFS), else filevol refuses to start.
#   nomad job run deploy/nomad/controller.nomad.hcl
#   nomad job run deploy/nomad/node.nomad.hcl

job "filevol-controller" {
  type = "service"

  group "controller" {
    count = 1

    task "filevol" {
      driver = "docker"

      config {
        image = "ghcr.io/filevol/filevol:0.1.0"
        args = [
          "serve",
          "--mode=controller",
          "--endpoint=unix:///csi/csi.sock",
          "--pool=/var/lib/filevol",
          "--node-id=${node.unique.name}",
        ]
        mount {
          type   = "bind"
          source = "/var/lib/filevol"
          target = "/var/lib/filevol"
        }
      }

      csi_plugin {
        id        = "filevol.csi.rs"
        type      = "controller"
        mount_dir = "/csi"
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
