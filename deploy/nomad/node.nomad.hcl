# filevol on Nomad: the node plugin, on every client (see
# controller.nomad.hcl for the whole picture). Privileged: it attaches loop
# devices and mounts; kubelet-dir is the container side of Nomad's
# stage_publish_base_dir, where Nomad puts staging and target paths.

job "filevol-node" {
  type = "system"

  group "node" {
    task "filevol" {
      driver = "docker"

      config {
        image      = "ghcr.io/filevol/filevol:0.1.0"
        privileged = true
        args = [
          "serve",
          "--mode=node",
          "--endpoint=unix:///csi/csi.sock",
          "--pool=/var/lib/filevol",
          "--node-id=${node.unique.name}",
          "--kubelet-dir=/local/csi",
        ]
        mount {
          type   = "bind"
          source = "/var/lib/filevol"
          target = "/var/lib/filevol"
        }
        mount {
          type   = "bind"
          source = "/dev"
          target = "/dev"
        }
      }

      csi_plugin {
        id                     = "filevol.csi.rs"
        type                   = "node"
        mount_dir              = "/csi"
        stage_publish_base_dir = "/local/csi"
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
