/*
 * gw_realip.h - the real client address of a request: the peer of the
 * connection, unless the peer is one of the configured "trusted_proxies",
 * in which case the address that proxy reported (X-Forwarded-For, taken
 * from the right past every trusted hop, or X-Real-IP), as nginx's realip
 * module does with real_ip_recursive on.
 *
 * Used by rate limits keyed by client and by X-Forwarded-For sent upstream
 * (extended only behind a trusted proxy). gw_conn_client_ip() and
 * gw_conn_peer_trusted() (gw_conn.h) apply it to a connection's request.
 */
#ifndef GW_REALIP_H
#define GW_REALIP_H

#include "gw_config.h"
#include "gw_core.h"

/* Longest address text, NUL included (INET6_ADDRSTRLEN). */
#define GW_REALIP_MAX 46

/*
 * Parses "10.0.0.0/8", "::1/128" or a bare address (a /32 or /128) into
 * out. An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is an IPv4 one. Returns
 * GW_ERR with the reason in err when s is not an address block, or has bits
 * set beyond its prefix (a typo that would trust more or less than meant).
 */
int gw_realip_parse_cidr(const char *s, gw_cidr_t *out, char *err, size_t errlen);

/*
 * Parses one address of a forwarding header: "1.2.3.4", "::1", "[::1]",
 * "[::1]:80" or "1.2.3.4:80" (len bytes, no spaces). On success fills
 * family (AF_INET or AF_INET6; mapped IPv4 becomes AF_INET) and addr
 * (4 or 16 bytes) and returns true.
 */
bool gw_realip_parse_addr(const char *s, size_t len, int *family, unsigned char addr[16]);

/* Whether the address (as from gw_realip_parse_addr) is in cfg->trusted_proxies. */
bool gw_realip_trusted(const gw_config_t *cfg, int family, const unsigned char addr[16]);

/* Whether peer_ip (the connection's peer, text) is a trusted proxy under
 * cfg. Cached in r (per request). */
bool gw_realip_peer_trusted(const gw_config_t *cfg, gw_req_t *r, const char *peer_ip);

/*
 * The real client address of request r from peer_ip under cfg, as text ("203.0.113.7",
 * "2001:db8::1"): the peer unless it is trusted; then, for X-Forwarded-For
 * (all its fields as one list), the right-most entry that is not itself a
 * trusted proxy (the left-most valid one when all are), malformed entries
 * skipped; for X-Real-IP its value when it is an address. The peer when the
 * header holds no usable address. Computed once per request; the result is
 * borrowed from the request and valid until the next one.
 */
const char *gw_realip_get(const gw_config_t *cfg, gw_req_t *r, const char *peer_ip);

#endif
