/*
 * gw_upstream.c - backend connections and per-worker keep-alive pools (see
 * gw_upstream.h). Upstream connections use bufferevents: they bring the
 * asynchronous connect and, later, bufferevent_openssl for TLS.
 */
#include "gw_upstream.h"
#include "gw_config.h"
#include "gw_log.h"
#include "gw_server.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>

static void
upstream_close(gw_upstream_t *u)
{
    u->pool->nopen--;
    if (u->idle_timer)
        event_free(u->idle_timer);
    bufferevent_free(u->bev); /* closes the socket */
    free(u);
}

static void
idle_unlink(gw_upstream_t *u)
{
    gw_pool_t *pool = u->pool;
    for (gw_upstream_t **pp = &pool->idle; *pp; pp = &(*pp)->next)
        if (*pp == u) {
            *pp = u->next;
            pool->nidle--;
            break;
        }
    u->next = NULL;
}

/* Anything from an idle connection (data, EOF, error) makes it unusable. */
static void
idle_read_cb(struct bufferevent *bev, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(bev);
    gw_log_debug("backend %s: unexpected data on an idle connection; closing it", u->pool->backend->name);
    idle_unlink(u);
    upstream_close(u);
}

static void
idle_event_cb(struct bufferevent *bev, short what, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(bev);
    GW_UNUSED(what);
    idle_unlink(u);
    upstream_close(u);
}

static void
idle_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_upstream_t *u = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    idle_unlink(u);
    upstream_close(u);
}

void
gw_upstream_pools_init(gw_worker_t *w)
{
    w->pools = gw_calloc(w->cfg->nbackends, sizeof(gw_pool_t));
    for (size_t i = 0; i < w->cfg->nbackends; i++)
        w->pools[i].backend = w->cfg->backends[i];
}

void
gw_upstream_pools_free(gw_worker_t *w)
{
    if (w->pools == NULL)
        return;
    for (size_t i = 0; i < w->cfg->nbackends; i++)
        while (w->pools[i].idle) {
            gw_upstream_t *u = w->pools[i].idle;
            idle_unlink(u);
            upstream_close(u);
        }
    free(w->pools);
    w->pools = NULL;
}

int
gw_upstream_get(gw_worker_t *w, const gw_backend_t *b, bool fresh, gw_upstream_t **out)
{
    gw_pool_t *pool = &w->pools[b->index];
    if (!fresh && pool->idle) {
        gw_upstream_t *u = pool->idle;
        idle_unlink(u);
        event_del(u->idle_timer);
        bufferevent_setcb(u->bev, NULL, NULL, NULL, NULL);
        u->reused = true;
        *out = u;
        return GW_OK;
    }
    if (pool->nopen >= b->max_connections) {
        if (pool->idle == NULL)
            return GW_AGAIN;
        /* fresh was asked for and the pool is full: make room */
        gw_upstream_t *old = pool->idle;
        idle_unlink(old);
        upstream_close(old);
    }
    struct bufferevent *bev = bufferevent_socket_new(w->base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL)
        return GW_ERR;
    gw_upstream_t *u = gw_calloc(1, sizeof(gw_upstream_t));
    u->pool = pool;
    u->w = w;
    u->bev = bev;
    u->idle_timer = evtimer_new(w->base, idle_timeout_cb, u);
    pool->nopen++;
    struct timeval tv = { b->connect_timeout_ms / 1000, (b->connect_timeout_ms % 1000) * 1000 };
    bufferevent_set_timeouts(bev, NULL, &tv); /* a connect completes as a write */
    if (bufferevent_socket_connect(bev, (const struct sockaddr *)&b->addr, (int)b->addrlen) != 0) {
        int err = errno;
        upstream_close(u);
        errno = err;
        return GW_ERR;
    }
    evutil_socket_t fd = bufferevent_getfd(bev);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    *out = u;
    return GW_OK;
}

void
gw_upstream_release(gw_upstream_t *u, bool reusable)
{
    gw_pool_t *pool = u->pool;
    const gw_backend_t *b = pool->backend;
    struct evbuffer *in = bufferevent_get_input(u->bev);
    if (!reusable || !u->connected || pool->nidle >= b->max_idle || evbuffer_get_length(in) > 0 ||
        u->w->stopping) {
        upstream_close(u);
        return;
    }
    u->requests++;
    bufferevent_set_timeouts(u->bev, NULL, NULL);
    bufferevent_setcb(u->bev, idle_read_cb, NULL, idle_event_cb, u);
    bufferevent_enable(u->bev, EV_READ);
    struct timeval tv = { b->idle_timeout_ms / 1000, (b->idle_timeout_ms % 1000) * 1000 };
    event_add(u->idle_timer, &tv);
    u->next = pool->idle;
    pool->idle = u;
    pool->nidle++;
}
