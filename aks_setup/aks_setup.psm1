# aks_setup: installs prometheus-community's windows_exporter on a Windows node with PowerShell DSC.
#
# The Azure VMSS DSC extension (publisher Microsoft.Powershell, type DSC) runs it from aks_setup.zip,
# which scripts/package_aks_setup.py builds: this file at the zip's root (settings
# configuration.script = "aks_setup.psm1", configuration.function = "Setup") and
# windows_exporter-<version>-amd64.msi and data/windows_exporter-collectors.json beside it.
#
# Read docs/exporter-sources.md first: AKS treats extensions added to its node scale sets as
# unsupported changes, they do not survive a reimage or upgrade unless applied again, and the DSC
# extension retires on 2028-03-31. AKS's built-in exporter (port 19182) needs none of this.
#
# Before anything else, Setup refuses a Collectors list with a name the MSI's windows_exporter
# version does not have (from data/windows_exporter-collectors.json): such an exporter exits at start
# ("unknown collector cs" for 0.31.0 and later), and since the MSI starts the service without waiting,
# the install would "succeed" and only Start-Service would fail, on every node.
# The defaults are for windows_exporter 0.31.3 (they are valid from 0.24.0 on).
#
# What Setup does, and why it can run any number of times:
#   * TestScript is true only when the windows_exporter service exists and runs with the wanted
#     version, port and collectors (read back from the service's command line and the installed
#     product's version), and, when a textfile directory or a REMOTE_ADDR allow-list is asked for,
#     when the last install by this configuration used those too (recorded in a small state file:
#     neither can be read back reliably). So an already configured node is left alone.
#   * SetScript starts the service if it is configured as wanted and merely stopped. Otherwise it runs
#       msiexec /i <msi> /qn /norestart /l*v <log> ADDLOCAL=FirewallException LISTEN_PORT=... ENABLED_COLLECTORS=...
#     waits for it (retrying while another installation holds the installer, exit code 1618), and
#     fails the configuration, with the tail of the log, on any exit code other than 0 or 3010
#     (success, reboot pending; the node is not rebooted). Running the MSI over an installed one
#     reinstalls it with the new properties; an older MSI over a newer install fails.
#   * GetScript reports the version, port and collectors found, as JSON in Result.

Configuration Setup
{
    param
    (
        # windows_exporter's port. 9182 is its default; the proxy's PROXY_PORT must match.
        [ValidateRange(1, 65535)]
        [int] $Port = 9182,

        # Comma-separated collectors; '[defaults]' stands for windows_exporter's default set. Each must
        # exist in the MSI's version. Default: windows_exporter 0.31's own default set, plus container
        # (the pods' metrics on a Kubernetes node) and tcp.
        [ValidatePattern('^[a-z0-9_\[\]]+(,[a-z0-9_\[\]]+)*$')]
        [string] $Collectors = 'cpu,container,logical_disk,memory,net,os,physical_disk,service,system,tcp',

        # Optional: directories for the textfile collector (MSI property TEXTFILE_DIRS).
        [string] $TextfileDirectory = '',

        # Optional: the firewall rule's remote address allow-list (MSI property REMOTE_ADDR), for
        # example the pod CIDR, so only pods reach the exporter. Empty leaves the rule open to any address.
        [string] $RemoteAddress = '',

        # The MSI to install. Empty: the one windows_exporter-<version>-amd64.msi next to this file.
        [string] $MsiPath = ''
    )

    Import-DscResource -ModuleName 'PSDesiredStateConfiguration'

    # Resolved now, when the extension compiles the configuration next to the unpacked zip; the
    # Script resource below receives plain values through $using:.
    if (-not $MsiPath) {
        $found = @(Get-ChildItem -Path $PSScriptRoot -Filter 'windows_exporter-*-amd64.msi')
        if ($found.Count -ne 1) {
            throw "Expected one windows_exporter-<version>-amd64.msi next to aks_setup.psm1, found $($found.Count)"
        }
        $MsiPath = $found[0].FullName
    }
    if ([IO.Path]::GetFileName($MsiPath) -notmatch '^windows_exporter-([0-9]+\.[0-9]+\.[0-9]+)-amd64\.msi$') {
        throw "Cannot read the windows_exporter version from the MSI's name: $MsiPath"
    }
    $WantedVersion = $Matches[1]

    # Refuse collectors the version lacks, now, before anything is installed (see the header). The
    # table is the one scripts/package_aks_setup.py checks with; it puts the file in the zip at this
    # same path. A version missing from it cannot be checked, so it is refused too.
    $CollectorData = Join-Path $PSScriptRoot 'data\windows_exporter-collectors.json'
    if (-not (Test-Path -LiteralPath $CollectorData)) {
        throw "Cannot check Collectors: $CollectorData is missing (scripts/package_aks_setup.py puts it in the zip)"
    }
    $Release = (Get-Content -Raw -LiteralPath $CollectorData | ConvertFrom-Json).versions.PSObject.Properties["v$WantedVersion"]
    if (-not $Release) {
        throw "Cannot check Collectors: windows_exporter $WantedVersion is not in $CollectorData; add that release's collectors to it"
    }
    $Known = @($Release.Value.collectors)
    # -cnotcontains: windows_exporter's collector names are case-sensitive.
    $Unknown = @(($Collectors -split ',') | Where-Object { $_ -ne '[defaults]' -and $Known -cnotcontains $_ } | Sort-Object -Unique)
    if ($Unknown.Count -gt 0) {
        $names = ($Unknown | ForEach-Object { "'$_'" }) -join ', '
        throw "Collectors lists $names, which windows_exporter $WantedVersion does not have: it would refuse to start (unknown collector). Nothing was installed. Its collectors: $($Known -join ',')"
    }
    $WantedCollectors = (($Collectors -split ',') | Sort-Object -Unique) -join ','
    $StateFile = Join-Path $env:ProgramData 'windows-metrics-proxy\aks_setup.json'
    $WantedExtras = @{ TextfileDirectory = $TextfileDirectory; RemoteAddress = $RemoteAddress } | ConvertTo-Json -Compress

    # Reads the installed exporter back: a hashtable, or $null when the service does not exist. Get,
    # Test and Set all run it (a Script resource's blocks cannot share functions), as code text passed
    # through $using: and turned back into a script block on the node.
    $Probe = ({
            $service = Get-CimInstance -ClassName Win32_Service -Filter "Name='windows_exporter'" -ErrorAction SilentlyContinue
            if (-not $service) { return $null }
            $commandLine = [string] $service.PathName

            # The MSI passes --web.listen-address only for a port other than 9182 (older exporters
            # used --telemetry.addr), and --collectors.enabled only when ENABLED_COLLECTORS is set.
            $port = 9182
            if ($commandLine -match '--(?:web\.listen-address|telemetry\.addr)[= ]"?[^" ]*:([0-9]+)') {
                $port = [int] $Matches[1]
            }
            $collectors = ''
            if ($commandLine -match '--collectors\.enabled[= ]"?([^" ]+)') {
                $collectors = (($Matches[1] -split ',') | Sort-Object -Unique) -join ','
            }
            $version = ''
            $uninstallKeys = @(
                'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\*',
                'HKLM:\SOFTWARE\WOW6432Node\Microsoft\Windows\CurrentVersion\Uninstall\*'
            )
            $product = Get-ItemProperty -Path $uninstallKeys -ErrorAction SilentlyContinue |
                Where-Object { $_.PSObject.Properties['DisplayName'] -and $_.DisplayName -like 'windows_exporter*' } |
                Select-Object -First 1
            if ($product -and $product.PSObject.Properties['DisplayVersion']) {
                $version = [string] $product.DisplayVersion
            }
            # Three parts, so that 0.31.3 and 0.31.3.0 compare equal.
            if ($version -match '^[0-9]+(\.[0-9]+){2,3}$') { $version = ([version] $version).ToString(3) }
            return @{
                Version    = $version
                Port       = $port
                Collectors = $collectors
                Running    = ($service.State -eq 'Running')
            }
        }).ToString()

    # Are the extras (textfile directory, REMOTE_ADDR) those of the last install? They cannot be read
    # back reliably, so Set records them in $StateFile. An empty value is a value too: clearing a
    # RemoteAddress or TextfileDirectory set before must reinstall without it, so the recorded ones
    # are compared whenever there is a record. With no record, nothing asked for matches.
    $ExtrasMatch = ({
            param($Wanted, $StateFile)
            if (-not (Test-Path -LiteralPath $StateFile)) {
                return (-not ($Wanted.TextfileDirectory -or $Wanted.RemoteAddress))
            }
            $recorded = Get-Content -Raw -LiteralPath $StateFile | ConvertFrom-Json
            return ([string] $recorded.TextfileDirectory -ceq [string] $Wanted.TextfileDirectory -and
                [string] $recorded.RemoteAddress -ceq [string] $Wanted.RemoteAddress)
        }).ToString()

    Node localhost
    {
        Script WindowsExporter
        {
            GetScript  = {
                $state = & ([scriptblock]::Create($using:Probe))
                if (-not $state) { $state = @{ Version = ''; Port = 0; Collectors = '' } }
                $report = [ordered]@{ Version = $state.Version; Port = $state.Port; Collectors = $state.Collectors }
                return @{ Result = ($report | ConvertTo-Json -Compress) }
            }

            TestScript = {
                $wantVersion = $using:WantedVersion
                $wantPort = $using:Port
                $wantCollectors = $using:WantedCollectors
                $wanted = $using:WantedExtras | ConvertFrom-Json
                $state = & ([scriptblock]::Create($using:Probe))
                if (-not $state) {
                    Write-Verbose 'windows_exporter is not installed'
                    return $false
                }
                $ok = $true
                if ($state.Version -ne $wantVersion) {
                    Write-Verbose "windows_exporter $($state.Version) is installed, $wantVersion is wanted"
                    $ok = $false
                }
                if ($state.Port -ne $wantPort) {
                    Write-Verbose "windows_exporter listens on $($state.Port), $wantPort is wanted"
                    $ok = $false
                }
                if ($state.Collectors -ne $wantCollectors) {
                    Write-Verbose "collectors are '$($state.Collectors)', '$wantCollectors' are wanted"
                    $ok = $false
                }
                if (-not $state.Running) {
                    Write-Verbose 'windows_exporter is not running'
                    $ok = $false
                }
                if (-not (& ([scriptblock]::Create($using:ExtrasMatch)) $wanted $using:StateFile)) {
                    Write-Verbose 'the textfile directory or REMOTE_ADDR differ from the last install'
                    $ok = $false
                }
                return $ok
            }

            SetScript  = {
                $ErrorActionPreference = 'Stop'
                $msi = $using:MsiPath
                $stateFile = $using:StateFile
                $wantVersion = $using:WantedVersion
                $wantPort = $using:Port
                $wantCollectors = $using:WantedCollectors
                $wanted = $using:WantedExtras | ConvertFrom-Json
                $state = & ([scriptblock]::Create($using:Probe))
                $extrasMatch = & ([scriptblock]::Create($using:ExtrasMatch)) $wanted $stateFile

                if ($state -and $state.Version -eq $wantVersion -and $state.Port -eq $wantPort -and
                    $state.Collectors -eq $wantCollectors -and $extrasMatch) {
                    # Installed as wanted and only stopped: start it rather than reinstall.
                    Write-Verbose 'windows_exporter is configured as wanted; starting it'
                    Start-Service -Name 'windows_exporter'
                    return
                }

                if (-not (Test-Path -LiteralPath $msi)) { throw "MSI not found: $msi" }
                $log = Join-Path $env:TEMP ('windows_exporter-install-{0:yyyyMMddHHmmss}.log' -f (Get-Date))
                $arguments = @(
                    '/i', ('"{0}"' -f $msi), '/qn', '/norestart', '/l*v', ('"{0}"' -f $log),
                    'ADDLOCAL=FirewallException',
                    ('LISTEN_PORT={0}' -f $wantPort),
                    ('ENABLED_COLLECTORS={0}' -f $wantCollectors)
                )
                if ($wanted.TextfileDirectory) { $arguments += ('TEXTFILE_DIRS="{0}"' -f $wanted.TextfileDirectory) }
                if ($wanted.RemoteAddress) { $arguments += ('REMOTE_ADDR="{0}"' -f $wanted.RemoteAddress) }

                # 1618: another installation is in progress (a freshly provisioned node may still be
                # busy); wait and try again a few times before giving up.
                for ($attempt = 1; ; $attempt++) {
                    Write-Verbose ('msiexec.exe {0}' -f ($arguments -join ' '))
                    $process = Start-Process -FilePath 'msiexec.exe' -ArgumentList $arguments -Wait -PassThru -NoNewWindow
                    if ($process.ExitCode -ne 1618 -or $attempt -ge 10) { break }
                    Write-Verbose "another installation is in progress (1618); retrying in 30 s ($attempt/10)"
                    Start-Sleep -Seconds 30
                }
                switch ($process.ExitCode) {
                    0 { Write-Verbose 'windows_exporter installed' }
                    3010 { Write-Warning 'windows_exporter installed; Windows reports a reboot pending (the node is not rebooted)' }
                    default {
                        $tail = ''
                        if (Test-Path -LiteralPath $log) { $tail = (Get-Content -LiteralPath $log -Tail 30) -join "`n" }
                        throw "msiexec exited with $($process.ExitCode); log: $log`n$tail"
                    }
                }

                New-Item -ItemType Directory -Force -Path (Split-Path -Parent $stateFile) | Out-Null
                [ordered]@{
                    Version           = $wantVersion
                    Port              = $wantPort
                    Collectors        = $wantCollectors
                    TextfileDirectory = $wanted.TextfileDirectory
                    RemoteAddress     = $wanted.RemoteAddress
                    Msi               = $msi
                } | ConvertTo-Json | Set-Content -Encoding UTF8 -LiteralPath $stateFile

                $service = Get-Service -Name 'windows_exporter' -ErrorAction SilentlyContinue
                if (-not $service) { throw 'msiexec succeeded but there is no windows_exporter service' }
                if ($service.Status -ne 'Running') { Start-Service -Name 'windows_exporter' }
            }
        }
    }
}
