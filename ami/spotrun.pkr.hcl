# The spotrun instance image: Docker Engine reachable only on its Unix socket, sshd that admits
# public keys alone and forwards nothing but local Unix-socket channels, and cloud-init set to
# take the run's host key and client key from user-data. The build itself runs on a spot
# instance with IMDSv2 required and an encrypted root volume, like the jobs it serves.

packer {
  required_version = ">= 1.10.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = "~> 1.3"
    }
  }
}

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "Region to build in; the AMI is registered there only."
}

variable "base_os" {
  type        = string
  default     = "ubuntu-24.04"
  description = "Base image: ubuntu-24.04 (latest Canonical build) or al2023 (Amazon Linux 2023)."

  validation {
    condition     = contains(["ubuntu-24.04", "al2023"], var.base_os)
    error_message = "The base_os must be ubuntu-24.04 or al2023."
  }
}

variable "architecture" {
  type        = string
  default     = "x86_64"
  description = "CPU architecture of the image; spot_instance_types must match it."

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "The architecture must be x86_64 or arm64."
  }
}

variable "spot_instance_types" {
  type = list(string)
  # Several types in several families so one pool without spot capacity does not fail the build.
  default     = ["t3.medium", "t3a.medium", "m5.large", "m5a.large", "m6i.large", "m6a.large"]
  description = "Instance types the build may run on; EC2 Fleet picks from them."

  validation {
    condition     = length(var.spot_instance_types) > 0
    error_message = "The spot_instance_types list must name at least one type."
  }
}

variable "volume_size_gb" {
  type        = number
  default     = 20
  description = "Root volume size in GiB; instances launched from the AMI get at least this."
}

variable "kms_key_id" {
  type        = string
  default     = ""
  description = "KMS key for the root volume; empty means the account's default EBS key."
}

variable "ami_name_prefix" {
  type        = string
  default     = "spotrun"
  description = "AMI names are PREFIX-BASE_OS-ARCHITECTURE-TIMESTAMP."
}

variable "prepull_images" {
  type        = list(string)
  default     = []
  description = "Images pulled into the AMI so jobs using them start without a pull."
}

variable "extra_tags" {
  type        = map(string)
  default     = {}
  description = "Tags added to the build's resources and to the AMI and its snapshot."
}

locals {
  timestamp   = formatdate("YYYYMMDD-hhmmss", timestamp())
  ubuntu_arch = var.architecture == "x86_64" ? "amd64" : "arm64"

  # The root device name differs between the two bases and must match the source AMI's, or the
  # encrypted volume below would be attached as a second disk instead of replacing the root.
  bases = {
    "ubuntu-24.04" = {
      owner       = "099720109477"
      name        = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-${local.ubuntu_arch}-server-*"
      ssh_user    = "ubuntu"
      root_device = "/dev/sda1"
    }
    "al2023" = {
      owner       = "137112412989"
      name        = "al2023-ami-2023.*-kernel-6.*-${var.architecture}"
      ssh_user    = "ec2-user"
      root_device = "/dev/xvda"
    }
  }
  base = local.bases[var.base_os]

  tags = merge(var.extra_tags, {
    "spotrun:component" = "ami"
    "spotrun:base-os"   = var.base_os
  })
}

source "amazon-ebs" "spotrun" {
  region          = var.region
  ami_name        = "${var.ami_name_prefix}-${var.base_os}-${var.architecture}-${local.timestamp}"
  ami_description = "spotrun job host (${var.base_os}, ${var.architecture})"

  source_ami_filter {
    filters = {
      name                = local.base.name
      architecture        = var.architecture
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = [local.base.owner]
    most_recent = true
  }

  ssh_username            = local.base.ssh_user
  temporary_key_pair_type = "ed25519"

  spot_price               = "auto"
  spot_instance_types      = var.spot_instance_types
  spot_allocation_strategy = "price-capacity-optimized"
  # If Packer dies mid-build, a shutdown from inside still removes the instance.
  shutdown_behavior = "terminate"

  # The build instance runs third-party installers; a hop limit of 1 keeps IMDS tokens out of
  # any container started during the build, as on the job instances.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"

  launch_block_device_mappings {
    device_name           = local.base.root_device
    volume_size           = var.volume_size_gb
    volume_type           = "gp3"
    encrypted             = true
    kms_key_id            = var.kms_key_id
    delete_on_termination = true
  }

  run_tags        = merge(local.tags, { Name = "spotrun-ami-build" })
  run_volume_tags = local.tags
  spot_tags       = local.tags
  fleet_tags      = local.tags
  snapshot_tags   = local.tags
  tags = merge(local.tags, {
    Name                 = "${var.ami_name_prefix}-${var.base_os}-${var.architecture}"
    "spotrun:source-ami" = "{{ .SourceAMI }}"
  })
}

build {
  name    = "spotrun"
  sources = ["source.amazon-ebs.spotrun"]

  provisioner "shell" {
    inline = ["install -d -m 0700 /tmp/spotrun-ami-files"]
  }

  provisioner "file" {
    source      = "${path.root}/files/"
    destination = "/tmp/spotrun-ami-files"
  }

  # The scripts run as root with only these variables; the order matters: Docker must be
  # configured before the pre-pull, and the strip step must come last because it removes the
  # build user's key and the uploaded files.
  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "SPOTRUN_SSH_USER=${local.base.ssh_user}",
      "SPOTRUN_AMI_FILES=/tmp/spotrun-ami-files",
      "SPOTRUN_PREPULL_IMAGES=${join(" ", var.prepull_images)}",
    ]
    scripts = [
      "${path.root}/scripts/10-docker.sh",
      "${path.root}/scripts/20-sshd.sh",
      "${path.root}/scripts/30-cloud-init.sh",
      "${path.root}/scripts/40-prepull.sh",
      "${path.root}/scripts/50-no-background-updates.sh",
      "${path.root}/scripts/90-strip-identity.sh",
    ]
  }
}
