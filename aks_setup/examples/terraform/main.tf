# Example: add the DSC extension that runs aks_setup (installs windows_exporter) to an AKS Windows
# node pool's scale set.
#
# Read docs/exporter-sources.md before using it. AKS treats changes made to its node scale sets
# through the IaaS APIs, extensions included, as unsupported, and they do not survive a node image
# upgrade, reimage or cluster upgrade unless applied again (re-run `terraform apply` after each).
# The DSC extension retires on 2028-03-31. Where AKS's built-in exporter (port 19182) runs, none of
# this is needed.
#
# Not applied anywhere by this project's tests, which only check that it names the same script,
# function and parameters as aks_setup/aks_setup.psm1, and that its default
# collectors exist in windows_exporter 0.31.3.

terraform {
  required_providers {
    azurerm = {
      source = "hashicorp/azurerm"
      # v4 is what this example is written for: it requires the subscription in the provider block.
      version = "~> 4.0"
    }
  }
}

provider "azurerm" {
  features {}
  subscription_id = var.subscription_id
}

variable "subscription_id" {
  description = "The subscription of the cluster (azurerm v4 requires it; `az account show --query id -o tsv`)."
  type        = string
}

variable "node_resource_group" {
  description = "The cluster's node resource group (az aks show --query nodeResourceGroup), where AKS keeps the scale sets."
  type        = string
}

variable "windows_vmss_name" {
  description = "The Windows node pool's scale set (az vmss list -g <node resource group> -o table)."
  type        = string
}

variable "aks_setup_zip_url" {
  description = "Where the nodes can download aks_setup.zip, as built by scripts/package_aks_setup.py."
  type        = string
}

variable "exporter_port" {
  description = "windows_exporter's port; the proxy's PROXY_PORT must match."
  type        = number
  default     = 9182
}

# Each collector must exist in the version of the MSI in aks_setup.zip, or the configuration fails
# before installing (windows_exporter would exit at start: `cs`, for one, is gone from 0.31.0 on).
# This default is for windows_exporter 0.31.3; check another list with
# `scripts/package_aks_setup.py --collectors <list>` when you build the zip.
variable "exporter_collectors" {
  description = "Comma-separated windows_exporter collectors, each one the packaged MSI's version has."
  type        = string
  default     = "cpu,container,logical_disk,memory,net,os,physical_disk,service,system,tcp"
}

variable "exporter_remote_address" {
  description = "Optional firewall allow-list for the exporter's port (e.g. the pod CIDR); empty allows any address."
  type        = string
  default     = ""
}

data "azurerm_virtual_machine_scale_set" "windows" {
  name                = var.windows_vmss_name
  resource_group_name = var.node_resource_group
}

locals {
  # The DSC extension's public settings: the zip, the script at its root, the configuration in it.
  dsc_settings = {
    wmfVersion = "latest"
    configuration = {
      url      = var.aks_setup_zip_url
      script   = "aks_setup.psm1"
      function = "Setup"
    }
    configurationArguments = {
      Port          = var.exporter_port
      Collectors    = var.exporter_collectors
      RemoteAddress = var.exporter_remote_address
    }
    privacy = {
      dataCollection = "Disable"
    }
  }
}

resource "azurerm_virtual_machine_scale_set_extension" "aks_setup" {
  name                         = "Microsoft.Powershell.DSC"
  virtual_machine_scale_set_id = data.azurerm_virtual_machine_scale_set.windows.id
  publisher                    = "Microsoft.Powershell"
  type                         = "DSC"
  type_handler_version         = "2.83"
  auto_upgrade_minor_version   = true
  # AKS's own Custom Script Extension sets the node up first; this one must run after it.
  provision_after_extensions = ["vmssCSE"]
  settings                   = jsonencode(local.dsc_settings)
}
