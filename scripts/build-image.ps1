<#
.SYNOPSIS
    Builds the Windows images of windows-metrics-proxy (ltsc2022 and ltsc2025) and pushes one
    multi-OS manifest list.

.DESCRIPTION
    Runs on a Windows host with Docker in Windows-container mode (Windows images cannot be built on
    Linux). For each Windows version it

      1. resolves the digests of mcr.microsoft.com/windows/servercore:<version> and
         .../nanoserver:<version> (with `crane digest` if it is on PATH, else with
         `docker buildx imagetools inspect`), unless -BaseDigests gives them;
      2. builds Dockerfile.windows with those digests, the pinned Python version and its SHA256,
         and tags <Image>:<Version>-<windows version> and <Image>:<Version>-<windows version>-<BuildId>;
      3. writes every pin it used to build\image-pins.json, so the same build can be repeated with
         -BaseDigests.

    With -Push it pushes both images and then <Image>:<Version> and <Image>:<Version>-<BuildId>,
    the same manifest list whose entries carry os.version (10.0.20348.x, 10.0.26100.x), which is
    what lets containerd on a node pick the image that matches the node's Windows build. It then
    adds the pushed digests to build\image-pins.json. A rebuild (for Windows' monthly base image
    updates) reuses the <Version> tags but never a <BuildId> tag: deploy by digest or by a <BuildId>
    tag (docs/windows-image.md, "Pinning the image").

    A WS2022 host can build the ltsc2025 image only with -Isolation hyperv; a WS2025 host builds
    both with process isolation.

.PARAMETER Image
    The repository to tag and push, for example myregistry.azurecr.io/windows-metrics-proxy.

.PARAMETER Version
    The image tag. Defaults to the version in proxy\__init__.py.

.PARAMETER BuildId
    What makes this build's unique tags unique. Defaults to the UTC time, yyyyMMddHHmm; a CI run
    number works too. Letters, digits and dots, starting with a digit (so it never reads as a
    release name).

.PARAMETER PythonVersion
    CPython 3.13.x or 3.14.x, installed from python.org's python-<version>-amd64.exe.

.PARAMETER PythonSha256
    The SHA256 of that installer. The default belongs to the default PythonVersion; give both when
    changing the version. Where the default comes from, and how to check it: docs/windows-image.md.

.PARAMETER BaseDigests
    Digests to use instead of resolving them, keyed by image reference, for example
    @{ 'mcr.microsoft.com/windows/nanoserver:ltsc2022' = 'sha256:...' }.

.EXAMPLE
    .\scripts\build-image.ps1 -Image myregistry.azurecr.io/windows-metrics-proxy -Push
#>
[CmdletBinding()]
param(
    # Options = 'None': PowerShell matches patterns ignoring case unless told otherwise, and an image
    # repository must be lowercase.
    [Parameter(Mandatory = $true)]
    [ValidatePattern('^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+$', Options = 'None')]
    [string] $Image,

    [string] $Version = '',

    [ValidatePattern('^[0-9][0-9A-Za-z.]*$')]
    [string] $BuildId = '',

    # Case-sensitive too: the value becomes the base image's tag and this image's tag suffix.
    [ValidateSet('ltsc2022', 'ltsc2025', IgnoreCase = $false)]
    [string[]] $WindowsVersions = @('ltsc2022', 'ltsc2025'),

    [ValidatePattern('^3\.1[34]\.[0-9]+$')]
    [string] $PythonVersion = '3.14.5',

    # python-3.14.5-amd64.exe, as pinned by docker-library/python's Windows images (which take it
    # from python.org); not re-checked against python.org by this project: see docs/windows-image.md.
    [ValidatePattern('^[0-9A-Fa-f]{64}$')]
    [string] $PythonSha256 = 'f9c09f5ed6f796fd1a8bc5ddfa41715a494b453c4781f0e35d5077cf9fa58f6d',

    [hashtable] $BaseDigests = @{},

    [ValidateSet('default', 'process', 'hyperv')]
    [string] $Isolation = 'default',

    # Accept pure-Python aiohttp/multidict/yarl if their compiled extensions do not load on
    # nanoserver (the image self-test fails otherwise). Pods then need AIOHTTP_NO_EXTENSIONS=1 too.
    [switch] $AllowPurePython,

    [switch] $Push
)

$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

$root = Split-Path -Parent $PSScriptRoot
$dockerfile = Join-Path $root 'Dockerfile.windows'

function Invoke-Native {
    param([string] $What, [string] $Command, [string[]] $Arguments)
    Write-Host ('> {0} {1}' -f $Command, ($Arguments -join ' '))
    & $Command @Arguments
    if ($LASTEXITCODE -ne 0) { throw "$What failed: $Command exited with $LASTEXITCODE" }
}

function Get-ProjectVersion {
    $init = Get-Content -Raw -LiteralPath (Join-Path $root 'proxy\__init__.py')
    if ($init -notmatch '__version__\s*=\s*"([^"]+)"') { throw 'No __version__ in proxy\__init__.py' }
    return $Matches[1]
}

function Resolve-Digest {
    param([string] $Reference)
    if ($BaseDigests.ContainsKey($Reference)) {
        $digest = [string] $BaseDigests[$Reference]
    }
    elseif (Get-Command crane -ErrorAction SilentlyContinue) {
        $digest = (& crane digest $Reference | Out-String).Trim()
        if ($LASTEXITCODE -ne 0) { throw "crane digest $Reference failed" }
    }
    else {
        $digest = (& docker buildx imagetools inspect $Reference --format '{{.Manifest.Digest}}' | Out-String).Trim()
        if ($LASTEXITCODE -ne 0) { throw "docker buildx imagetools inspect $Reference failed (install crane, or pass -BaseDigests)" }
    }
    if ($digest -cnotmatch '^sha256:[0-9a-f]{64}$') { throw "Not a digest for ${Reference}: '$digest'" }
    Write-Host "$Reference -> $digest"
    return $digest
}

if (-not $Version) { $Version = Get-ProjectVersion }
if (-not $BuildId) { $BuildId = (Get-Date).ToUniversalTime().ToString('yyyyMMddHHmm') }
$pins = [ordered]@{
    image          = $Image
    version        = $Version
    build_id       = $BuildId
    python_version = $PythonVersion
    python_sha256  = $PythonSha256.ToLowerInvariant()
    builds         = @()
    manifest_list  = $null
}

$pinsFile = Join-Path $root 'build\image-pins.json'
function Write-Pins {
    New-Item -ItemType Directory -Force -Path (Split-Path -Parent $pinsFile) | Out-Null
    $pins | ConvertTo-Json -Depth 5 | Set-Content -Encoding UTF8 -LiteralPath $pinsFile
    Write-Host "Pins written to $pinsFile"
}

$tags = @()
$uniqueTags = @()
foreach ($windowsVersion in $WindowsVersions) {
    $servercore = "mcr.microsoft.com/windows/servercore:$windowsVersion"
    $nanoserver = "mcr.microsoft.com/windows/nanoserver:$windowsVersion"
    $servercoreDigest = Resolve-Digest $servercore
    $nanoserverDigest = Resolve-Digest $nanoserver
    $tag = '{0}:{1}-{2}' -f $Image, $Version, $windowsVersion
    $uniqueTag = '{0}-{1}' -f $tag, $BuildId

    $buildArgs = @(
        'build', '--file', $dockerfile, '--isolation', $Isolation, '--tag', $tag, '--tag', $uniqueTag,
        '--build-arg', "WINDOWS_VERSION=$windowsVersion",
        '--build-arg', "SERVERCORE_DIGEST=$servercoreDigest",
        '--build-arg', "NANOSERVER_DIGEST=$nanoserverDigest",
        '--build-arg', "PYTHON_VERSION=$PythonVersion",
        '--build-arg', "PYTHON_SHA256=$PythonSha256"
    )
    if ($AllowPurePython) { $buildArgs += @('--build-arg', 'AIOHTTP_NO_EXTENSIONS=1') }
    Invoke-Native "Building $tag" 'docker' ($buildArgs + @($root))

    $osVersion = (& docker image inspect --format '{{.OsVersion}}' $tag | Out-String).Trim()
    if ($LASTEXITCODE -ne 0 -or -not $osVersion) { throw "Cannot read the OS version of $tag" }
    $pins.builds += [ordered]@{
        tag                = $tag
        unique_tag         = $uniqueTag
        digest             = $null
        windows_version    = $windowsVersion
        os_version         = $osVersion
        servercore         = "$servercore@$servercoreDigest"
        nanoserver         = "$nanoserver@$nanoserverDigest"
    }
    $tags += $tag
    $uniqueTags += $uniqueTag
}

Write-Pins

if ($Push) {
    foreach ($build in $pins.builds) {
        foreach ($name in @($build.tag, $build.unique_tag)) { Invoke-Native "Pushing $name" 'docker' @('push', $name) }
        $build.digest = Resolve-Digest $build.unique_tag
    }

    # The same list twice: under the moving tag, and under one that no rebuild reuses.
    $list = '{0}:{1}' -f $Image, $Version
    $uniqueList = '{0}-{1}' -f $list, $BuildId
    foreach ($name in @($list, $uniqueList)) {
        Invoke-Native "Creating $name" 'docker' (@('manifest', 'create', '--amend', $name) + $uniqueTags)
        foreach ($build in $pins.builds) {
            Invoke-Native "Annotating $($build.unique_tag)" 'docker' @(
                'manifest', 'annotate', '--os', 'windows', '--arch', 'amd64',
                '--os-version', $build.os_version, $name, $build.unique_tag)
        }
        Invoke-Native "Pushing $name" 'docker' @('manifest', 'push', '--purge', $name)
    }
    $pins.manifest_list = [ordered]@{ tag = $list; unique_tag = $uniqueList; digest = (Resolve-Digest $uniqueList) }
    Write-Pins
    Write-Host "Pushed $list and $uniqueList for: $(($tags + $uniqueTags) -join ', ')"
    Write-Host "Deploy by digest: $Image@$($pins.manifest_list.digest) (docs/windows-image.md, 'Pinning the image')"
}
else {
    Write-Host "Built $(($tags + $uniqueTags) -join ', '); run again with -Push to push them and the manifest lists."
}
