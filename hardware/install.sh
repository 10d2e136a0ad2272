#!/usr/bin/env bash
# Install the footfall agent on a Raspberry Pi access point (64-bit Raspberry Pi OS or Debian 12).
#
#   sudo hardware/install.sh --radio wlan1 --site my-shop --agent door --timezone Europe/Paris \
#       --broker mqtt.example.net:8883 --tls-ca system --receipt-key KEY --broker-password-stdin
#
# What it does, each step only if needed (running it twice changes nothing):
#   1. apt: python3-venv, python3-dev, gcc, iw        (not with --root or --no-apt)
#   2. the 'footfall' system user (systemd-sysusers)
#   3. /etc/footfall (root:footfall 0750) with agent.toml (0640, kept if present; the site, agent
#      id, time zone, broker and receipt key given here are set in it, the broker account
#      '<site>/<agent>' too), /var/lib/footfall (the spool) and /var/cache/footfall (numba's
#      cache), footfall's, 0700; the radio's name pinned: /etc/systemd/network/
#      10-footfall-radio.link matches the USB adapter's own (permanent) address and names it
#      footfall0 at every boot, however many radios the kernel finds, in whatever order (a live
#      install renames it now; the address is the sensor's own radio's, and stays on the Pi)
#   4. the agent in a virtual environment, /opt/footfall (not with --no-venv)
#   5. the signing key, /etc/footfall/signing.key (footfall's, 0600), if there is none
#   6. footfall-monitor.service (makes mon0 with iw), footfall-agent.service (hardened),
#      /etc/default/footfall-monitor (kept if present), NetworkManager told to leave the radio
#   7. the kernels compiled ahead of time (footfall-agent build-kernels; a minute or two on a
#      Pi 4), or if that fails numba's cache filled once, as the footfall user
#   8. systemd: reload, enable both units, start the monitor interface
#   also: /usr/local/bin/footfall-agent (a link) and /usr/local/sbin/footfall-doctor
# Then: 'footfall-agent enrol' (or the aggregator's web page), 'footfall-doctor',
# 'systemctl start footfall-agent', 'footfall-doctor' again: every line ok once a window is stored.
#
# --root DIR installs into DIR instead of / (an image, or a throwaway root for the tests): no apt,
# no systemctl, and the units are not started.
set -euo pipefail

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	cat <<'EOF'
Options:
  --root DIR       install into DIR instead of /
  --source PATH    what pip installs (default: the checkout this script is in)
  --radio IF       the USB adapter's interface that listens (default wlan1); its name is
                   pinned as footfall0 by its own address (a systemd .link file)
  --monitor IF     the monitor interface to make (default mon0)
  --channel N      the channel to listen on (default 6)
  --site ID        agent.site: the site the aggregator's admin made
  --agent ID       agent.id: this agent's id in the site (else the host name, with a warning)
  --timezone ZONE  epoch.timezone: the shop's IANA zone (else the system's, with a warning)
  --broker HOST[:PORT]  broker.host and broker.port; the account is '<site>/<agent>'
  --tls-ca FILE    broker.tls_ca: the CA that signed the broker's certificate, or 'system'
  --broker-password-stdin  broker.password from the first line of standard input
  --receipt-key KEY  broker.receipt_key ('footfall-aggregator receipt-key' prints it)
  --no-apt         do not install Debian packages
  --no-venv        do not make the virtual environment (nor the key, nor the cache)
  --upgrade        reinstall the agent even if the same version is installed
  -h, --help       this help
EOF
}

here=$(cd "$(dirname "$0")" && pwd)
root=/
source_path=$(dirname "$here")
radio=wlan1
pinned=footfall0 # the radio's name once its .link file applies
monitor=mon0
channel=6
site=""
agent_id=""
timezone=""
broker=""
password=no
receipt_key=""
tls_ca=""
apt=yes
venv=yes
upgrade=no

while [ $# -gt 0 ]; do
	case "$1" in
	--root) root=${2:?--root needs a directory}; shift 2 ;;
	--source) source_path=${2:?--source needs a path}; shift 2 ;;
	--radio) radio=${2:?--radio needs an interface}; shift 2 ;;
	--monitor) monitor=${2:?--monitor needs an interface}; shift 2 ;;
	--channel) channel=${2:?--channel needs a number}; shift 2 ;;
	--site) site=${2:?--site needs an id}; shift 2 ;;
	--agent) agent_id=${2:?--agent needs an id}; shift 2 ;;
	--timezone) timezone=${2:?--timezone needs a zone such as Europe/Paris}; shift 2 ;;
	--broker) broker=${2:?--broker needs HOST[:PORT]}; shift 2 ;;
	--broker-password-stdin) password=yes; shift ;;
	--tls-ca) tls_ca=${2:?--tls-ca needs a file or 'system'}; shift 2 ;;
	--receipt-key) receipt_key=${2:?--receipt-key needs a key}; shift 2 ;;
	--no-apt) apt=no; shift ;;
	--no-venv) venv=no; shift ;;
	--upgrade) upgrade=yes; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "install.sh: unknown option $1 (--help lists them)" >&2; exit 2 ;;
	esac
done

say() { printf 'footfall-install: %s\n' "$*"; }
die() {
	printf 'footfall-install: error: %s\n' "$*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root (sudo), it installs system files"
[ -d "$root" ] || die "--root $root is not a directory"
r=${root%/}                # prefix of every installed path ('' for /)
live=no                    # installing into the running system?
[ -z "$r" ] && live=yes
case "$channel" in '' | *[!0-9]*) die "--channel must be a number, got '$channel'" ;; esac
for name in "$radio" "$monitor"; do
	case "$name" in '' | *[!A-Za-z0-9_.-]*) die "not an interface name: '$name'" ;; esac
done
for id in "$site" "$agent_id"; do
	case "$id" in
	'') ;;
	[a-z0-9]*[!a-z0-9_-]* | [!a-z0-9]*)
		die "not an id: '$id' (lower-case letters, digits, '_' and '-', from a letter or digit)" ;;
	esac
done
if [ -n "$timezone" ] && [ ! -e "/usr/share/zoneinfo/$timezone" ]; then
	die "--timezone $timezone is not a time zone (ls /usr/share/zoneinfo; e.g. Europe/Paris)"
fi
broker_host=${broker%:*}
broker_port=""
[ "$broker_host" = "$broker" ] || broker_port=${broker##*:}
case "$broker_port" in *[!0-9]*) die "--broker HOST[:PORT]: the port must be a number" ;; esac
secret=""
if [ "$password" = yes ]; then
	IFS= read -r secret || true
	[ -n "$secret" ] || die "--broker-password-stdin: the first line of standard input is empty"
fi

changes=0
changed() {
	changes=$((changes + 1))
	say "$*"
}

# The numeric id of a user or group in the target root's /etc/passwd or /etc/group (root: 0).
id_in() {
	if [ "$2" = root ]; then
		echo 0
	elif [ -f "$r/etc/$1" ]; then
		awk -F: -v n="$2" '$1 == n { print $3; found = 1 } END { exit !found }' "$r/etc/$1"
	else
		return 1
	fi
}

# ensure_owner PATH MODE USER GROUP: set a path's mode and owner where they differ.
ensure_owner() {
	local path=$1 mode=$2 want have
	want="$(id_in passwd "$3"):$(id_in group "$4") $mode"
	have=$(stat -c '%u:%g %a' "$path")
	if [ "$have" != "$want" ]; then
		chown "${want% *}" "$path"
		chmod "$mode" "$path"
		changed "set ${path#"$r"} to $3:$4 $mode"
	fi
}

# ensure_dir DIR MODE USER GROUP
ensure_dir() {
	if [ ! -d "$r$1" ]; then
		mkdir -p "$r$1"
		changed "made $1"
	fi
	ensure_owner "$r$1" "$2" "$3" "$4"
}

# put_file SRC DEST MODE USER GROUP [keep]: copy where the content differs ('keep': only if absent).
put_file() {
	local src=$1 dest=$r$2
	if [ -e "$dest" ] && { [ "${6:-}" = keep ] || cmp -s "$src" "$dest"; }; then
		:
	else
		mkdir -p "$(dirname "$dest")"
		cp "$src" "$dest"
		changed "wrote $2"
	fi
	ensure_owner "$dest" "$3" "$4" "$5"
}

# put_text DEST MODE USER GROUP [keep] < text
put_text() {
	local text
	text=$(mktemp)
	cat >"$text"
	put_file "$text" "$@"
	rm -f "$text"
}

# 1. Debian packages
if [ "$live" = yes ]; then
	case "$(uname -m)" in
	aarch64 | x86_64) ;;
	*) die "this is a $(uname -m) system: numba needs a 64-bit OS (64-bit Raspberry Pi OS)" ;;
	esac
fi
if [ "$live" = yes ] && [ "$apt" = yes ]; then
	missing=()
	for package in python3-venv python3-dev gcc iw; do
		dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
		changed "installed ${missing[*]}"
	fi
fi

# 2. the user
mkdir -p "$r/etc"
put_file "$here/systemd/footfall.sysusers" /usr/lib/sysusers.d/footfall.conf 644 root root
if ! id_in passwd footfall >/dev/null 2>&1; then
	command -v systemd-sysusers >/dev/null || die "systemd-sysusers is missing (package systemd)"
	systemd-sysusers --root="$root" "$r/usr/lib/sysusers.d/footfall.conf" >/dev/null 2>&1
	changed "made the user footfall"
fi

# 3. directories and configuration
ensure_dir /etc/footfall 750 root footfall
ensure_dir /var/lib/footfall 700 footfall footfall
ensure_dir /var/cache/footfall 700 footfall footfall
put_file "$here/agent.toml" /etc/footfall/agent.toml 640 root footfall keep

# set_setting TABLE KEY VALUE: KEY = VALUE (TOML) in [TABLE] of agent.toml, in place of the
# key's line (or its commented example), else first in the table, else in a new table.
set_setting() {
	local file=$r/etc/footfall/agent.toml edited
	edited=$(mktemp)
	awk -v table="$1" -v key="$2" -v value="$3" '
		function put() { print key " = " value; done = 1 }
		/^[ \t]*\[/ {
			if (inside && !done) put()
			inside = ($0 ~ "^[ \t]*\\[" table "\\]")
			print; next
		}
		inside && !done && $0 ~ "^[ \t]*#?[ \t]*" key "[ \t]*=" { put(); next }
		{ print }
		END {
			if (inside && !done) put()
			else if (!done) { print ""; print "[" table "]"; put() }
		}' "$file" >"$edited"
	if cmp -s "$edited" "$file"; then
		rm -f "$edited"
		return
	fi
	cat "$edited" >"$file"
	rm -f "$edited"
	case "$1.$2" in
	broker.password) changed "set broker.password in /etc/footfall/agent.toml" ;;
	*) changed "set $1.$2 = $3 in /etc/footfall/agent.toml" ;;
	esac
}
toml() { printf '"%s"' "$1"; }
[ -z "$site" ] || set_setting agent site "$(toml "$site")"
[ -z "$agent_id" ] || set_setting agent id "$(toml "$agent_id")"
[ -z "$timezone" ] || set_setting epoch timezone "$(toml "$timezone")"
[ -z "$broker_host" ] || set_setting broker host "$(toml "$broker_host")"
[ -z "$broker_port" ] || set_setting broker port "$broker_port"
if [ -n "$site" ] && [ -n "$agent_id" ]; then
	set_setting broker username "$(toml "$site/$agent_id")"
fi
[ -z "$secret" ] || set_setting broker password "$(toml "$secret")"
[ -z "$tls_ca" ] || set_setting broker tls_ca "$(toml "$tls_ca")"
[ -z "$receipt_key" ] || set_setting broker receipt_key "$(toml "$receipt_key")"

# The radio's name, pinned by its own (permanent) address: a .link file (systemd-udevd) names
# it footfall0 at every boot, whichever radio the kernel finds first.
link=/etc/systemd/network/10-footfall-radio.link
if [ "$radio" != "$pinned" ] && [ -e "/sys/class/net/$radio/address" ]; then
	# its burnt-in address (ip shows 'permaddr' when the current one differs), as at boot
	address=$(ip -d link show dev "$radio" | sed -n 's/.* permaddr \([0-9a-f:]*\).*/\1/p')
	[ -n "$address" ] || address=$(cat "/sys/class/net/$radio/address")
	put_text "$link" 644 root root <<EOF
# footfall: the USB radio that listens (install.sh --radio $radio), named $pinned at every
# boot whatever order the kernel finds the radios in. The address is this sensor's own radio's.
[Match]
MACAddress=$address

[Link]
Name=$pinned
EOF
	if [ "$live" = yes ]; then
		ip link set "$radio" down
		ip link set "$radio" name "$pinned"
		changed "renamed $radio to $pinned (as the .link file does at every boot)"
	fi
	radio=$pinned
elif [ -e "$r$link" ]; then
	radio=$pinned
else
	say "no interface $radio here, so its name is not pinned: 'ip link' lists the radios;" \
		"run again with --radio IF"
fi
put_text /etc/default/footfall-monitor 644 root root keep <<EOF
# footfall-monitor.service: the USB adapter that listens, the monitor interface it makes, the channel.
FOOTFALL_RADIO=$radio
FOOTFALL_MONITOR=$monitor
FOOTFALL_CHANNEL=$channel
EOF

# 4. the agent
ensure_dir /opt/footfall 755 root root
agent=$r/opt/footfall/bin/footfall-agent
if [ "$venv" = yes ]; then
	if [ ! -x "$r/opt/footfall/bin/python" ]; then
		python3 -m venv "$r/opt/footfall"
		changed "made the virtual environment /opt/footfall"
	fi
	wanted=$(sed -n 's/^version = "\(.*\)"/\1/p' "$source_path/pyproject.toml" 2>/dev/null || true)
	installed=$("$agent" --version 2>/dev/null | awk '{ print $2 }' || true)
	if [ "$upgrade" = yes ] || [ -z "$installed" ] || [ "$installed" != "$wanted" ]; then
		"$r/opt/footfall/bin/pip" install -q --upgrade "$source_path"
		changed "installed footfall ${wanted:-from $source_path} in /opt/footfall"
	fi
fi
put_file "$here/footfall-monitor" /opt/footfall/libexec/footfall-monitor 755 root root
put_file "$here/footfall-doctor" /usr/local/sbin/footfall-doctor 755 root root
mkdir -p "$r/usr/local/bin"
if [ "$(readlink "$r/usr/local/bin/footfall-agent" || true)" != /opt/footfall/bin/footfall-agent ]; then
	ln -sfn /opt/footfall/bin/footfall-agent "$r/usr/local/bin/footfall-agent"
	changed "linked /usr/local/bin/footfall-agent"
fi

# 5. the signing key
if [ "$venv" = yes ] && [ ! -e "$r/etc/footfall/signing.key" ]; then
	"$agent" keygen --set "agent.config_dir=$r/etc/footfall" >/dev/null 2>&1
	changed "made the signing key /etc/footfall/signing.key (footfall-agent enrol prints it)"
fi
if [ -e "$r/etc/footfall/signing.key" ]; then
	ensure_owner "$r/etc/footfall/signing.key" 600 footfall footfall
fi

# 6. units, and NetworkManager leaves the radio alone
units_before=$changes
put_file "$here/systemd/footfall-monitor.service" /etc/systemd/system/footfall-monitor.service \
	644 root root
put_file "$here/systemd/footfall-agent.service" /etc/systemd/system/footfall-agent.service \
	644 root root
put_text /etc/NetworkManager/conf.d/90-footfall.conf 644 root root <<EOF
# footfall: the radio that listens (and its monitor interface) is not NetworkManager's.
[keyfile]
unmanaged-devices=interface-name:$radio;interface-name:$monitor
EOF
units_changed=$((changes - units_before))

# 7. the kernels compiled ahead of time into /opt/footfall/lib/footfall-kernels (the agent then
#    never loads numba: ~130 MB less); if that fails, numba's cache, filled as the agent's user
if [ "$live" = yes ] && [ "$venv" = yes ]; then
	if ! "$r/opt/footfall/bin/python" -c 'import setuptools' 2>/dev/null; then
		"$r/opt/footfall/bin/pip" install -q setuptools
		changed "installed setuptools in /opt/footfall (numba.pycc builds with it)"
	fi
	errors=$(mktemp)
	if built=$("$agent" build-kernels 2>"$errors"); then
		case "$built" in
		"up to date: "*) ;;
		*) changed "compiled the agent's kernels ahead of time: ${built#built }" ;;
		esac
	else
		say "the kernels' ahead-of-time build failed (it needs gcc and python3-dev):"
		tail -n 3 "$errors" >&2
		cache=/var/cache/footfall/numba
		if [ -z "$(find "$cache" -name '*.nbi' 2>/dev/null | head -n 1)" ]; then
			say "compiling the agent's kernels into $cache instead (about a minute on a Pi 4)"
			runuser -u footfall -- env NUMBA_CACHE_DIR="$cache" "$agent" replay >/dev/null
			changed "filled numba's cache $cache"
		fi
	fi
	rm -f "$errors"
fi

# 8. systemd
if [ "$live" = yes ] && [ -d /run/systemd/system ]; then
	if [ "$units_changed" -gt 0 ]; then
		systemctl daemon-reload
		changed "reloaded systemd"
	fi
	for unit in footfall-monitor.service footfall-agent.service; do
		if ! systemctl is-enabled --quiet "$unit"; then
			systemctl enable --quiet "$unit"
			changed "enabled $unit"
		fi
	done
	if ! systemctl is-active --quiet footfall-monitor.service; then
		systemctl start footfall-monitor.service || say "footfall-monitor did not start:" \
			"journalctl -u footfall-monitor says why"
		changed "started footfall-monitor.service"
	fi
fi

if [ "$changes" -eq 0 ]; then
	say "nothing to change: footfall is installed in ${root}"
else
	say "$changes changes in ${root}"
fi
# What the agent will run as, stated: a default here bites later (doctor warns too).
setting() {
	awk -v table="$1" -v key="$2" '
		/^[ \t]*\[/ { inside = ($0 ~ "^[ \t]*\\[" table "\\]") }
		inside && $0 ~ "^[ \t]*" key "[ \t]*=" {
			sub("^[^=]*=[ \t]*", ""); sub("[ \t]*#.*$", ""); gsub("\"", ""); print; exit
		}' "$r/etc/footfall/agent.toml"
}
id_now=$(setting agent id)
zone_now=$(setting epoch timezone)
say "agent.site = $(setting agent site), agent.id = ${id_now:-(empty: the host name $(hostname))}," \
	"epoch.timezone = ${zone_now:-(empty: the zone of the system)}," \
	"broker $(setting broker host):$(setting broker port) as '$(setting broker username)'"
[ -n "$(setting broker receipt_key)" ] || say "broker.receipt_key is empty: --receipt-key" \
	"(footfall-aggregator receipt-key prints it), or doctor cannot see the windows stored"
say "next: 'footfall-agent enrol' (or the aggregator's web page), 'footfall-doctor'," \
	"then 'systemctl start footfall-agent' and 'footfall-doctor' again"
