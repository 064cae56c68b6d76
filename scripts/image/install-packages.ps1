<#
.SYNOPSIS
    Installs the proxy and its pinned dependencies into C:\Python, in the build stage of Dockerfile.windows.

.DESCRIPTION
    1. The runtime dependencies: exact versions, win_amd64 wheels only, each checked against the
       SHA256 list in requirements\windows-amd64.txt (pip's hash-checking mode).
    2. The project's own wheel, built from C:\src with the hash-pinned setuptools of
       requirements\windows-build.txt, which is installed into C:\buildtools and never into C:\Python.
    3. `pip check`, then pip itself is removed: nothing at run time needs it.
#>
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
Set-StrictMode -Version Latest

$python = 'C:\Python\python.exe'
$pipFlags = @('--no-cache-dir', '--disable-pip-version-check', '--no-input')

function Invoke-Python {
    param([string] $What, [string[]] $Arguments)
    & $python @Arguments
    if ($LASTEXITCODE -ne 0) { throw "$What failed with exit code $LASTEXITCODE" }
}

Invoke-Python 'Installing the pinned dependencies' (@('-m', 'pip', 'install') + $pipFlags + @(
        '--require-hashes', '--only-binary=:all:', '-r', 'C:\src\requirements\windows-amd64.txt'))

Invoke-Python 'Installing the build requirements' (@('-m', 'pip', 'install') + $pipFlags + @(
        '--require-hashes', '--only-binary=:all:', '--target', 'C:\buildtools',
        '-r', 'C:\src\requirements\windows-build.txt'))

$env:PYTHONPATH = 'C:\buildtools'
try {
    Invoke-Python 'Building the project wheel' (@('-m', 'pip', 'wheel') + $pipFlags + @(
            '--no-deps', '--no-build-isolation', '--no-index', '--wheel-dir', 'C:\wheels', 'C:\src'))
}
finally {
    Remove-Item Env:PYTHONPATH
}

$wheel = @(Get-ChildItem -Path 'C:\wheels' -Filter 'windows_metrics_proxy-*.whl')
if ($wheel.Count -ne 1) { throw "Expected one project wheel in C:\wheels, found $($wheel.Count)" }
Invoke-Python 'Installing the project wheel' (@('-m', 'pip', 'install') + $pipFlags + @(
        '--no-deps', '--no-index', $wheel[0].FullName))

Invoke-Python 'Checking installed requirements' (@('-m', 'pip', 'check') + $pipFlags)
Invoke-Python 'Listing installed packages' (@('-m', 'pip', 'list') + $pipFlags)
Invoke-Python 'Removing pip' (@('-m', 'pip', 'uninstall', '--yes') + $pipFlags + @('pip'))

Remove-Item -Recurse -Force -LiteralPath 'C:\buildtools', 'C:\wheels'
