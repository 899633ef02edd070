/*
 * gw_router.c - a segment trie of route patterns (see gw_router.h). Each
 * node has exact children, at most one parameter child and at most one
 * wildcard child; the routes ending at a node are kept with their method
 * masks and parameter names.
 */
#include "gw_router.h"
#include "gw_config.h"

#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct node_s node_t;

typedef struct {
    uint64_t methods;
    gw_route_t *route;
    char *params[GW_MAX_PARAMS];
    size_t nparams;
} end_t;

struct node_s {
    char *seg;
    size_t seglen;
    node_t **exact;
    size_t nexact;
    node_t *param;
    node_t *wild;
    end_t *ends;
    size_t nends;
};

struct gw_router_s {
    node_t root;
};

gw_router_t *
gw_router_new(void)
{
    return gw_calloc(1, sizeof(gw_router_t));
}

static void
node_free(node_t *n, bool self)
{
    if (n == NULL)
        return;
    for (size_t i = 0; i < n->nexact; i++)
        node_free(n->exact[i], true);
    free(n->exact);
    node_free(n->param, true);
    node_free(n->wild, true);
    for (size_t i = 0; i < n->nends; i++)
        for (size_t k = 0; k < n->ends[i].nparams; k++)
            free(n->ends[i].params[k]);
    free(n->ends);
    free(n->seg);
    if (self)
        free(n);
}

void
gw_router_free(gw_router_t *r)
{
    if (r == NULL)
        return;
    node_free(&r->root, false);
    free(r);
}

static node_t *
child_exact(node_t *n, const char *seg, size_t len, bool create)
{
    for (size_t i = 0; i < n->nexact; i++)
        if (n->exact[i]->seglen == len && memcmp(n->exact[i]->seg, seg, len) == 0)
            return n->exact[i];
    if (!create)
        return NULL;
    node_t *c = gw_calloc(1, sizeof(node_t));
    c->seg = gw_strndup(seg, len);
    c->seglen = len;
    n->exact = gw_realloc(n->exact, (n->nexact + 1) * sizeof(node_t *));
    n->exact[n->nexact++] = c;
    return c;
}

static bool
is_name_char(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_';
}

void
gw_router_format_methods(uint64_t methods, char *buf, size_t len)
{
    size_t n = 0;
    buf[0] = '\0';
    if (methods & (1ULL << HTTP_GET))
        methods |= 1ULL << HTTP_HEAD;
    for (int m = 0; m < 64 && n + 1 < len; m++) {
        if (!(methods & (1ULL << m)))
            continue;
        int k = snprintf(buf + n, len - n, "%s%s", n ? ", " : "", llhttp_method_name((llhttp_method_t)m));
        if (k < 0 || (size_t)k >= len - n)
            break;
        n += (size_t)k;
    }
}

int
gw_router_add(gw_router_t *r, const char *pattern, uint64_t methods, gw_route_t *route, char *err, size_t errlen)
{
    if (pattern[0] != '/') {
        snprintf(err, errlen, "path pattern must start with \"/\"");
        return GW_ERR;
    }
    node_t *n = &r->root;
    char *params[GW_MAX_PARAMS];
    size_t nparams = 0;
    const char *p = pattern + 1;
    while (*p) {
        const char *e = strchr(p, '/');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == 0) {
            if (e == NULL)
                break; /* trailing slash: "/users/" is "/users" */
            snprintf(err, errlen, "empty segment (\"//\") in path pattern");
            goto fail;
        }
        if (len == 1 && p[0] == '*') {
            if (e != NULL && e[1] != '\0') {
                snprintf(err, errlen, "\"*\" is only allowed as the last segment");
                goto fail;
            }
            if (n->wild == NULL)
                n->wild = gw_calloc(1, sizeof(node_t));
            n = n->wild;
            break;
        }
        if (p[0] == '{') {
            if (len < 3 || p[len - 1] != '}') {
                snprintf(err, errlen, "a parameter must be a whole segment: \"{name}\"");
                goto fail;
            }
            for (size_t i = 1; i < len - 1; i++)
                if (!is_name_char(p[i])) {
                    snprintf(err, errlen, "parameter name \"%.*s\" may only use letters, digits and \"_\"",
                             (int)(len - 2), p + 1);
                    goto fail;
                }
            for (size_t i = 0; i < nparams; i++)
                if (strlen(params[i]) == len - 2 && memcmp(params[i], p + 1, len - 2) == 0) {
                    snprintf(err, errlen, "parameter \"%s\" appears twice", params[i]);
                    goto fail;
                }
            if (nparams == GW_MAX_PARAMS) {
                snprintf(err, errlen, "more than %d parameters", GW_MAX_PARAMS);
                goto fail;
            }
            params[nparams++] = gw_strndup(p + 1, len - 2);
            if (n->param == NULL)
                n->param = gw_calloc(1, sizeof(node_t));
            n = n->param;
        } else {
            for (size_t i = 0; i < len; i++)
                if (p[i] == '{' || p[i] == '}' || p[i] == '*' || p[i] == '?' || p[i] == '#' || p[i] == '%' ||
                    (unsigned char)p[i] <= 0x20 || p[i] == 0x7f) {
                    snprintf(err, errlen, "character '%c' not allowed in literal segment \"%.*s\"", p[i],
                             (int)len, p);
                    goto fail;
                }
            if (len == 1 && p[0] == '.') {
                snprintf(err, errlen, "\".\" segments can never match a normalized path");
                goto fail;
            }
            if (len == 2 && p[0] == '.' && p[1] == '.') {
                snprintf(err, errlen, "\"..\" segments can never match a normalized path");
                goto fail;
            }
            n = child_exact(n, p, len, true);
        }
        if (e == NULL)
            break;
        p = e + 1;
    }
    for (size_t i = 0; i < n->nends; i++) {
        if (n->ends[i].methods & methods) {
            char mbuf[256];
            gw_router_format_methods(n->ends[i].methods & methods, mbuf, sizeof(mbuf));
            snprintf(err, errlen, "duplicate route: %s %s is already defined by %s", mbuf, pattern,
                     n->ends[i].route->where);
            goto fail;
        }
    }
    n->ends = gw_realloc(n->ends, (n->nends + 1) * sizeof(end_t));
    end_t *end = &n->ends[n->nends++];
    end->methods = methods;
    end->route = route;
    end->nparams = nparams;
    memcpy(end->params, params, nparams * sizeof(char *));
    return GW_OK;
fail:
    for (size_t i = 0; i < nparams; i++)
        free(params[i]);
    return GW_ERR;
}

static const end_t *
find_end(const node_t *n, int method, gw_match_t *m)
{
    uint64_t bit = 1ULL << method;
    for (size_t i = 0; i < n->nends; i++) {
        uint64_t ms = n->ends[i].methods;
        if ((ms & bit) || (method == HTTP_HEAD && (ms & (1ULL << HTTP_GET))))
            return &n->ends[i];
    }
    for (size_t i = 0; i < n->nends; i++)
        m->allow |= n->ends[i].methods;
    if (m->path_route == NULL && n->nends)
        m->path_route = n->ends[0].route;
    return NULL;
}

static bool
found(const end_t *end, const gw_path_t *path, size_t *caps, size_t ncaps, gw_match_t *m)
{
    m->route = end->route;
    m->nparams = ncaps;
    for (size_t i = 0; i < ncaps; i++) {
        m->params[i].name = end->params[i];
        m->params[i].value = path->buf + path->off[caps[i]];
        m->params[i].len = path->len[caps[i]];
    }
    return true;
}

static bool
match_node(const node_t *n, int method, const gw_path_t *path, size_t i, size_t *caps, size_t ncaps, gw_match_t *m)
{
    if (i == path->nseg) {
        const end_t *end = find_end(n, method, m);
        if (end != NULL)
            return found(end, path, caps, ncaps, m);
    } else {
        const char *seg = path->buf + path->off[i];
        size_t len = path->len[i];
        for (size_t k = 0; k < n->nexact; k++) {
            const node_t *c = n->exact[k];
            if (c->seglen == len && memcmp(c->seg, seg, len) == 0 &&
                match_node(c, method, path, i + 1, caps, ncaps, m))
                return true;
        }
        if (n->param != NULL && ncaps < GW_MAX_PARAMS) {
            caps[ncaps] = i;
            if (match_node(n->param, method, path, i + 1, caps, ncaps + 1, m))
                return true;
        }
    }
    if (n->wild != NULL) {
        const end_t *end = find_end(n->wild, method, m);
        if (end != NULL) {
            m->has_wildcard = true;
            m->wildcard_seg = i;
            return found(end, path, caps, ncaps, m);
        }
    }
    return false;
}

gw_route_result_t
gw_router_match(const gw_router_t *r, int method, const gw_path_t *path, gw_match_t *m)
{
    size_t caps[GW_MAX_PARAMS];
    memset(m, 0, sizeof(*m));
    if (method < 0 || method >= 64)
        return GW_ROUTE_NOT_FOUND;
    if (match_node(&r->root, method, path, 0, caps, 0, m))
        return GW_ROUTE_FOUND;
    return m->allow ? GW_ROUTE_BAD_METHOD : GW_ROUTE_NOT_FOUND;
}

int
gw_router_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int
gw_router_normalize(const char *raw, size_t len, gw_path_t *out)
{
    out->nseg = 0;
    gw_grow((void **)&out->buf, &out->buf_cap, len + 1, 1);
    size_t w = 0;
    size_t i = 0;
    while (i < len) {
        while (i < len && raw[i] == '/')
            i++;
        if (i == len)
            break;
        size_t start = w;
        while (i < len && raw[i] != '/') {
            char c = raw[i];
            if (c == '%') {
                int hi = i + 2 < len ? gw_router_hexval(raw[i + 1]) : -1;
                int lo = hi >= 0 ? gw_router_hexval(raw[i + 2]) : -1;
                if (lo < 0)
                    return GW_ERR;
                c = (char)(hi * 16 + lo);
                if (c == '\0')
                    return GW_ERR;
                i += 3;
            } else {
                i++;
            }
            out->buf[w++] = c;
        }
        size_t slen = w - start;
        if (slen == 1 && out->buf[start] == '.') {
            w = start;
            continue;
        }
        if (slen == 2 && out->buf[start] == '.' && out->buf[start + 1] == '.') {
            if (out->nseg == 0)
                return GW_ERR;
            out->nseg--;
            w = out->off[out->nseg];
            continue;
        }
        size_t scap = out->seg_cap;
        gw_grow((void **)&out->off, &scap, out->nseg + 1, sizeof(uint32_t));
        gw_grow((void **)&out->len, &out->seg_cap, out->nseg + 1, sizeof(uint32_t));
        out->off[out->nseg] = (uint32_t)start;
        out->len[out->nseg] = (uint32_t)slen;
        out->nseg++;
    }
    return GW_OK;
}

void
gw_path_free(gw_path_t *p)
{
    free(p->buf);
    free(p->off);
    free(p->len);
    memset(p, 0, sizeof(*p));
}
