#!/usr/bin/env bash
# Example: add the DSC extension that runs aks_setup (installs windows_exporter) to every Windows
# scale set in an AKS cluster's node resource group, with the Azure CLI.
#
#   ./install-dsc-extension.sh <node-resource-group> <aks_setup.zip URL> [port] [collectors] [remote-address]
#
# remote-address: the firewall rule's allow-list for the exporter's port (for example the pod CIDR);
# empty, the default, lets any address that can reach the node in.
#
# Read docs/exporter-sources.md before using it. AKS treats changes made to its node scale sets
# through the IaaS APIs, extensions included, as unsupported, and they do not survive a node image
# upgrade, reimage or cluster upgrade unless applied again (run this again after each). The DSC
# extension retires on 2028-03-31. Where AKS's built-in exporter (port 19182) runs, none of this is
# needed.
#
# Each collector must exist in the version of the MSI in aks_setup.zip, or the configuration fails
# before installing (windows_exporter would exit at start: `cs`, for one, is gone from 0.31.0 on).
# The default list is for windows_exporter 0.31.3; check another list with
# `scripts/package_aks_setup.py --collectors <list>` when you build the zip.
#
# Not run by this project's tests, which only check that it names the same script, function and
# parameters as aks_setup/aks_setup.psm1, and that its default
# collectors exist in windows_exporter 0.31.3.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
node_resource_group=$1
zip_url=$2
port=${3:-9182}
collectors=${4:-cpu,container,logical_disk,memory,net,os,physical_disk,service,system,tcp}
remote_address=${5:-}

settings=$(cat <<JSON
{
  "wmfVersion": "latest",
  "configuration": {
    "url": "${zip_url}",
    "script": "aks_setup.psm1",
    "function": "Setup"
  },
  "configurationArguments": {
    "Port": ${port},
    "Collectors": "${collectors}",
    "RemoteAddress": "${remote_address}"
  },
  "privacy": {
    "dataCollection": "Disable"
  }
}
JSON
)

# Windows scale sets are the ones with a windowsConfiguration in their OS profile.
mapfile -t scale_sets < <(az vmss list --resource-group "$node_resource_group" \
  --query "[?virtualMachineProfile.osProfile.windowsConfiguration != null].name" --output tsv)
if [ ${#scale_sets[@]} -eq 0 ]; then
  echo "no Windows scale sets in $node_resource_group" >&2
  exit 1
fi

for vmss in "${scale_sets[@]}"; do
  echo "adding the DSC extension to $vmss"
  az vmss extension set \
    --resource-group "$node_resource_group" \
    --vmss-name "$vmss" \
    --name DSC \
    --publisher Microsoft.Powershell \
    --version 2.83 \
    --extension-instance-name Microsoft.Powershell.DSC \
    --provision-after-extensions vmssCSE \
    --settings "$settings"
  # The scale set's model changed; bring the existing nodes up to it.
  az vmss update-instances --resource-group "$node_resource_group" --name "$vmss" --instance-ids '*'
done
