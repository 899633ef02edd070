/*
 * gw_realip.c - the real client address (see gw_realip.h).
 *
 * Trust is decided on addresses, never on text: the peer and every header
 * entry are parsed to bytes (IPv4-mapped IPv6 folded to IPv4, so a
 * dual-stack listener matches "10.0.0.0/8") and compared with the
 * configured blocks. The result is cached in the request (gw_req_t), so a
 * request that needs it several times (rate limit key, each aggregate
 * call's X-Forwarded-For) parses the headers once.
 */
#include "gw_realip.h"
#include "gw_http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

enum { TRUST_UNKNOWN = 0, TRUST_NO, TRUST_YES };

static const unsigned char v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* inet_pton on len bytes; folds mapped IPv4. */
static bool
parse_plain(const char *s, size_t len, int *family, unsigned char addr[16])
{
    char buf[GW_REALIP_MAX];
    if (len == 0 || len >= sizeof(buf))
        return false;
    memcpy(buf, s, len);
    buf[len] = '\0';
    memset(addr, 0, 16);
    if (memchr(buf, ':', len) == NULL) {
        *family = AF_INET;
        return inet_pton(AF_INET, buf, addr) == 1;
    }
    if (inet_pton(AF_INET6, buf, addr) != 1)
        return false;
    *family = AF_INET6;
    if (memcmp(addr, v4mapped, 12) == 0) {
        memmove(addr, addr + 12, 4);
        memset(addr + 4, 0, 12);
        *family = AF_INET;
    }
    return true;
}

bool
gw_realip_parse_addr(const char *s, size_t len, int *family, unsigned char addr[16])
{
    if (len > 0 && s[0] == '[') {
        const char *e = memchr(s, ']', len);
        if (e == NULL)
            return false;
        size_t rest = len - (size_t)(e + 1 - s);
        if (rest != 0) {
            /* "]:port" */
            if (rest < 2 || e[1] != ':' || rest > 6)
                return false;
            for (size_t i = 2; i < rest; i++)
                if (e[i] < '0' || e[i] > '9')
                    return false;
        }
        return parse_plain(s + 1, (size_t)(e - s - 1), family, addr) && *family == AF_INET6;
    }
    const char *colon = memchr(s, ':', len);
    if (colon != NULL && memchr(colon + 1, ':', len - (size_t)(colon + 1 - s)) == NULL) {
        /* exactly one colon: "1.2.3.4:port" */
        size_t plen = len - (size_t)(colon + 1 - s);
        if (plen == 0 || plen > 5)
            return false;
        for (size_t i = 0; i < plen; i++)
            if (colon[1 + i] < '0' || colon[1 + i] > '9')
                return false;
        return parse_plain(s, (size_t)(colon - s), family, addr) && *family == AF_INET;
    }
    return parse_plain(s, len, family, addr);
}

int
gw_realip_parse_cidr(const char *s, gw_cidr_t *out, char *err, size_t errlen)
{
    const char *slash = strchr(s, '/');
    size_t alen = slash ? (size_t)(slash - s) : strlen(s);
    int family;
    unsigned char addr[16];
    if (!parse_plain(s, alen, &family, addr)) {
        snprintf(err, errlen, "\"%s\" is not an address block like \"10.0.0.0/8\" or \"::1/128\"", s);
        return GW_ERR;
    }
    bool mapped = family == AF_INET && memchr(s, ':', alen) != NULL;
    unsigned max = family == AF_INET ? 32 : 128;
    unsigned bits = max;
    if (slash) {
        const char *d = slash + 1;
        unsigned v = 0;
        size_t n = 0;
        for (; d[n] >= '0' && d[n] <= '9' && n < 4; n++)
            v = v * 10 + (unsigned)(d[n] - '0');
        if (n == 0 || d[n] != '\0') {
            snprintf(err, errlen, "\"%s\": the prefix length after \"/\" must be a number", s);
            return GW_ERR;
        }
        if (mapped) {
            /* ::ffff:10.0.0.0/104 is 10.0.0.0/8 */
            if (v < 96 || v > 128) {
                snprintf(err, errlen, "\"%s\": an IPv4-mapped block needs a prefix of 96 to 128", s);
                return GW_ERR;
            }
            v -= 96;
        }
        if (v > max) {
            snprintf(err, errlen, "\"%s\": the prefix length is at most %u", s, max);
            return GW_ERR;
        }
        bits = v;
    }
    for (unsigned i = bits; i < max; i++)
        if (addr[i / 8] & (0x80 >> (i % 8))) {
            snprintf(err, errlen, "\"%s\": the address has bits set beyond the /%u prefix", s, bits);
            return GW_ERR;
        }
    out->family = family;
    out->bits = bits;
    memcpy(out->addr, addr, 16);
    return GW_OK;
}

static bool
in_block(const gw_cidr_t *b, int family, const unsigned char *addr)
{
    if (b->family != family)
        return false;
    unsigned full = b->bits / 8, rest = b->bits % 8;
    if (memcmp(b->addr, addr, full) != 0)
        return false;
    if (rest == 0)
        return true;
    unsigned char mask = (unsigned char)(0xff << (8 - rest));
    return (b->addr[full] & mask) == (addr[full] & mask);
}

bool
gw_realip_trusted(const gw_config_t *cfg, int family, const unsigned char addr[16])
{
    for (size_t i = 0; i < cfg->ntrusted; i++)
        if (in_block(&cfg->trusted_proxies[i], family, addr))
            return true;
    return false;
}

bool
gw_realip_peer_trusted(const gw_config_t *cfg, gw_req_t *r, const char *peer)
{
    if (r->peer_trust == TRUST_UNKNOWN) {
        int family;
        unsigned char addr[16];
        bool yes = cfg->ntrusted > 0 && gw_realip_parse_addr(peer, strlen(peer), &family, addr) &&
                   gw_realip_trusted(cfg, family, addr);
        r->peer_trust = yes ? TRUST_YES : TRUST_NO;
    }
    return r->peer_trust == TRUST_YES;
}

static bool
is_space(char ch)
{
    return ch == ' ' || ch == '\t';
}

/* Walks one X-Forwarded-For value from the right. *found: an untrusted
 * entry was found (the client; stop); *left: the left-most valid entry so
 * far (the answer when every entry is trusted). */
static void
scan_xff(const gw_config_t *cfg, const char *v, size_t len, bool *found, int *lfam, unsigned char *laddr,
         bool *have_left)
{
    size_t end = len;
    while (end > 0 && !*found) {
        size_t start = end;
        while (start > 0 && v[start - 1] != ',')
            start--;
        size_t a = start, b = end;
        while (a < b && is_space(v[a]))
            a++;
        while (b > a && is_space(v[b - 1]))
            b--;
        int family;
        unsigned char addr[16];
        if (gw_realip_parse_addr(v + a, b - a, &family, addr)) {
            *lfam = family;
            memcpy(laddr, addr, 16);
            *have_left = true;
            if (!gw_realip_trusted(cfg, family, addr))
                *found = true;
        }
        end = start > 0 ? start - 1 : 0;
    }
}

const char *
gw_realip_get(const gw_config_t *cfg, gw_req_t *r, const char *peer)
{
    if (r->client_ip[0] != '\0')
        return r->client_ip;
    bool have = false, found = false;
    int family = 0;
    unsigned char addr[16];
    if (gw_realip_peer_trusted(cfg, r, peer)) {
        bool xri = cfg->real_ip_header == GW_REALIP_X_REAL_IP;
        const char *name = xri ? "x-real-ip" : "x-forwarded-for";
        size_t nlen = strlen(name);
        /* Fields of a list header are one list in order: walk them from the last. */
        for (size_t i = r->nheaders; i-- > 0 && !found;) {
            const gw_header_t *h = &r->headers[i];
            if (h->name_len != nlen || strncasecmp(r->hbuf + h->name_off, name, nlen) != 0)
                continue;
            const char *v = r->hbuf + h->value_off;
            if (xri) {
                size_t a = 0, b = h->value_len;
                while (a < b && is_space(v[a]))
                    a++;
                while (b > a && is_space(v[b - 1]))
                    b--;
                have = found = gw_realip_parse_addr(v + a, b - a, &family, addr);
                break; /* the last X-Real-IP field only */
            }
            scan_xff(cfg, v, h->value_len, &found, &family, addr, &have);
        }
    }
    if (!have || inet_ntop(family, addr, r->client_ip, sizeof(r->client_ip)) == NULL)
        snprintf(r->client_ip, sizeof(r->client_ip), "%s", peer);
    return r->client_ip;
}
