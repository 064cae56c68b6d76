<#
.SYNOPSIS
    Installs CPython from python.org into C:\Python, in the servercore build stage of Dockerfile.windows.

.DESCRIPTION
    Reads PYTHON_VERSION (3.13.x or 3.14.x) and PYTHON_SHA256 from the environment, where Docker puts
    the build arguments of the same names, and refuses to run without them. The installer is checked
    against PYTHON_SHA256 before it runs; a mismatch fails the build. CompileAll=1 writes the standard
    library's .pyc files now, because the container's user cannot write them under C:\Python later.
#>
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
Set-StrictMode -Version Latest

$version = $env:PYTHON_VERSION
$expected = $env:PYTHON_SHA256
if ($version -notmatch '^3\.1[34]\.[0-9]+$') {
    throw "PYTHON_VERSION must be 3.13.x or 3.14.x, got '$version'"
}
if ($expected -notmatch '^[0-9A-Fa-f]{64}$') {
    throw 'PYTHON_SHA256 must be the 64 hex digit SHA256 of the installer (see docs/windows-image.md)'
}

$url = 'https://www.python.org/ftp/python/{0}/python-{0}-amd64.exe' -f $version
$installer = Join-Path $env:TEMP ('python-{0}-amd64.exe' -f $version)
$log = Join-Path $env:TEMP 'python-install.log'

[Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor [Net.SecurityProtocolType]::Tls12
Write-Host "Downloading $url"
Invoke-WebRequest -UseBasicParsing -Uri $url -OutFile $installer

$actual = (Get-FileHash -Algorithm SHA256 -LiteralPath $installer).Hash
if ($actual -ne $expected) {
    throw "SHA256 mismatch for ${url}: expected $expected, got $actual"
}
Write-Host "SHA256 verified: $actual"

$arguments = @(
    '/quiet', '/log', $log,
    'InstallAllUsers=1', 'TargetDir=C:\Python', 'PrependPath=0', 'Shortcuts=0', 'AssociateFiles=0',
    'CompileAll=1', 'Include_doc=0', 'Include_dev=0', 'Include_launcher=0', 'Include_pip=1',
    'Include_tcltk=0', 'Include_test=0'
)
$process = Start-Process -FilePath $installer -ArgumentList $arguments -Wait -PassThru -NoNewWindow
if ($process.ExitCode -ne 0) {
    if (Test-Path -LiteralPath $log) { Get-Content -LiteralPath $log -Tail 40 | Write-Host }
    throw "The Python installer exited with code $($process.ExitCode)"
}
Remove-Item -Force -LiteralPath $installer
Remove-Item -Force -ErrorAction SilentlyContinue -Path (Join-Path $env:TEMP 'python-install*.log')

$installed = & C:\Python\python.exe -c 'import platform; print(platform.python_version())'
if ($LASTEXITCODE -ne 0) { throw 'C:\Python\python.exe does not run' }
if ($installed -ne $version) { throw "Installed Python reports $installed, expected $version" }
Write-Host "Installed CPython $installed in C:\Python"
