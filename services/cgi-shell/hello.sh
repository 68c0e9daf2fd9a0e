#!/bin/sh
# A classic CGI script in POSIX shell (RFC 3875): cgipool runs it once per request
# with the request in the environment and the body on stdin; what it prints is
# the response: header fields, a blank line, the body.
#
#   GET /api/cgi-shell?name=you   -> {"greeting": "hello, you", "language": "sh", "pid": ...}
#   GET /api/cgi-shell/anything   -> 404
#   POST /api/cgi-shell           -> the same, with the body's length

# JSON string contents: backslash and quote escaped, control characters dropped.
json() { printf '%s' "$1" | tr -d '\000-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }

if [ -n "$PATH_INFO" ] && [ "$PATH_INFO" != "/" ]; then
    printf 'Status: 404 Not Found\r\nContent-Type: application/json\r\n\r\n'
    printf '{"error": "not found: %s", "pid": %d}\n' "$(json "$PATH_INFO")" $$
    exit 0
fi

name=$(printf '%s' "$QUERY_STRING" | tr '&' '\n' | sed -n 's/^name=//p' | head -n 1)
[ -n "$name" ] || name=world
body_bytes=0
if [ -n "$CONTENT_LENGTH" ] && [ "$CONTENT_LENGTH" -gt 0 ] 2>/dev/null; then
    body_bytes=$(head -c "$CONTENT_LENGTH" | wc -c | tr -d ' ')
fi
echo "hello.sh: $REQUEST_METHOD ?$QUERY_STRING from $REMOTE_ADDR" >&2

printf 'Content-Type: application/json\r\nCache-Control: no-store\r\n\r\n'
printf '{"greeting": "hello, %s", "language": "sh", "method": "%s", "body_bytes": %d, "gateway": "%s", "pid": %d}\n' \
    "$(json "$name")" "$(json "$REQUEST_METHOD")" "$body_bytes" "$(json "$GATEWAY_INTERFACE")" $$
