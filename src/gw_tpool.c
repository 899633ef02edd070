/*
 * gw_tpool.c - the pool of threads for bulk work, and the workers' ports
 * jobs come back through (see gw_tpool.h).
 *
 * One queue (a FIFO list under pool.mtx) feeds every pool thread. A port
 * is a worker's return list under its own mutex plus an eventfd: the pool
 * thread that appends to an empty list writes the eventfd once, and the
 * worker's loop takes the whole list in one go. The worker's event_base
 * has no locks (EVENT_BASE_FLAG_NOLOCK), so another thread never calls
 * event_active() on it: the eventfd is the only way in.
 */
#include "gw_tpool.h"

#include "gw_log.h"

#include <errno.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct gw_tport_s {
    pthread_mutex_t mtx;
    pthread_cond_t cv;       /* signalled with each return, for gw_tport_free */
    gw_tjob_t *head, *tail;  /* jobs back from the pool, oldest first */
    int efd;
    struct event *ev;
    unsigned pending;        /* posted and not back (worker thread only) */
};

static struct {
    pthread_mutex_t mtx;
    pthread_cond_t cv;
    gw_tjob_t *head, *tail;
    unsigned queued, running;
    unsigned max_queue;      /* atomic */
    bool stop;
    pthread_t *threads;
    unsigned nthreads;       /* atomic */
    uint64_t jobs, rejected; /* under mtx */
} pool = { .mtx = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

/* Hands job back to its port (a pool thread, or gw_tport_return's caller). */
static void
port_return(gw_tjob_t *job)
{
    gw_tport_t *p = job->port;
    job->next = NULL;
    pthread_mutex_lock(&p->mtx);
    bool was_empty = p->head == NULL;
    if (p->tail)
        p->tail->next = job;
    else
        p->head = job;
    p->tail = job;
    pthread_cond_signal(&p->cv);
    /* under the lock: once it is released the worker may take this job,
     * find nothing more pending and free the port */
    if (was_empty) {
        uint64_t one = 1;
        if (write(p->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
            gw_log(GW_LOG_ERR, "thread pool: cannot wake a worker: %s", strerror(errno));
    }
    pthread_mutex_unlock(&p->mtx);
}

static void *
pool_main(void *arg)
{
    char tag[16];
    snprintf(tag, sizeof(tag), "tp%u", (unsigned)(uintptr_t)arg);
    gw_log_set_thread(tag);
    pthread_mutex_lock(&pool.mtx);
    for (;;) {
        while (pool.head == NULL && !pool.stop)
            pthread_cond_wait(&pool.cv, &pool.mtx);
        if (pool.head == NULL)
            break; /* stopping, and nothing is left */
        gw_tjob_t *job = pool.head;
        pool.head = job->next;
        if (pool.head == NULL)
            pool.tail = NULL;
        pool.queued--;
        pool.running++;
        pthread_mutex_unlock(&pool.mtx);
        job->run(job);
        port_return(job);
        pthread_mutex_lock(&pool.mtx);
        pool.running--;
        pool.jobs++;
    }
    pthread_mutex_unlock(&pool.mtx);
    return NULL;
}

int
gw_tpool_start(unsigned threads, unsigned max_queue, char *err, size_t errlen)
{
    pool.stop = false;
    pool.max_queue = max_queue;
    pool.threads = gw_calloc(threads, sizeof(pthread_t));
    for (unsigned i = 0; i < threads; i++) {
        int rc = pthread_create(&pool.threads[i], NULL, pool_main, (void *)(uintptr_t)i);
        if (rc != 0) {
            snprintf(err, errlen, "cannot start a thread of the thread pool: %s", strerror(rc));
            gw_tpool_stop();
            return GW_ERR;
        }
        __atomic_store_n(&pool.nthreads, i + 1, __ATOMIC_RELAXED);
    }
    return GW_OK;
}

void
gw_tpool_set_max_queue(unsigned max_queue)
{
    __atomic_store_n(&pool.max_queue, max_queue, __ATOMIC_RELAXED);
}

unsigned
gw_tpool_threads(void)
{
    return __atomic_load_n(&pool.nthreads, __ATOMIC_RELAXED);
}

void
gw_tpool_stop(void)
{
    pthread_mutex_lock(&pool.mtx);
    pool.stop = true;
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mtx);
    unsigned n = gw_tpool_threads();
    for (unsigned i = 0; i < n; i++)
        pthread_join(pool.threads[i], NULL);
    if (pool.head)
        gw_log(GW_LOG_ERR, "thread pool: stopped with %u jobs queued", pool.queued);
    free(pool.threads);
    pool.threads = NULL;
    __atomic_store_n(&pool.nthreads, 0, __ATOMIC_RELAXED);
}

int
gw_tpool_post(gw_tport_t *port, gw_tjob_t *job, bool force)
{
    job->port = port;
    job->next = NULL;
    job->cancelled = false;
    pthread_mutex_lock(&pool.mtx);
    if (!force && pool.queued >= __atomic_load_n(&pool.max_queue, __ATOMIC_RELAXED)) {
        pool.rejected++;
        pthread_mutex_unlock(&pool.mtx);
        return GW_AGAIN;
    }
    if (pool.tail)
        pool.tail->next = job;
    else
        pool.head = job;
    pool.tail = job;
    pool.queued++;
    pthread_cond_signal(&pool.cv);
    pthread_mutex_unlock(&pool.mtx);
    port->pending++;
    return GW_OK;
}

void
gw_tpool_stats(gw_tpool_stats_t *out)
{
    pthread_mutex_lock(&pool.mtx);
    out->threads = gw_tpool_threads();
    out->max_queue = __atomic_load_n(&pool.max_queue, __ATOMIC_RELAXED);
    out->queued = pool.queued;
    out->running = pool.running;
    out->jobs = pool.jobs;
    out->rejected = pool.rejected;
    pthread_mutex_unlock(&pool.mtx);
}

/* --- ports ------------------------------------------------------------------ */

/* How long one turn of a worker's loop runs done callbacks; what is left
 * waits for the next turn, so twenty answers back at once never hold up
 * the other connections for the time of twenty. */
#define DRAIN_SLICE_US 1000

/* Runs the done callbacks of the jobs back on p (its worker's thread): all
 * of them when all, else for about DRAIN_SLICE_US (the rest next turn). */
static void
port_drain(gw_tport_t *p, bool all)
{
    pthread_mutex_lock(&p->mtx);
    gw_tjob_t *job = p->head;
    p->head = p->tail = NULL;
    pthread_mutex_unlock(&p->mtx);
    uint64_t start = gw_now_us();
    while (job) {
        if (!all && gw_now_us() - start >= DRAIN_SLICE_US) {
            /* put the rest back in front, and come back after the other events */
            pthread_mutex_lock(&p->mtx);
            gw_tjob_t *last = job;
            while (last->next)
                last = last->next;
            last->next = p->head;
            if (p->head == NULL)
                p->tail = last;
            p->head = job;
            pthread_mutex_unlock(&p->mtx);
            event_active(p->ev, EV_READ, 0);
            return;
        }
        gw_tjob_t *next = job->next;
        p->pending--;
        job->done(job); /* may free job, or post it again */
        job = next;
    }
}

static void
port_cb(evutil_socket_t fd, short what, void *arg)
{
    uint64_t v;
    GW_UNUSED(what);
    if (read(fd, &v, sizeof(v)) < 0) {
        /* EAGAIN: the list was taken by an earlier wake-up, or this is a next turn */
    }
    port_drain(arg, false);
}

gw_tport_t *
gw_tport_new(struct event_base *base)
{
    gw_tport_t *p = gw_calloc(1, sizeof(*p));
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) {
        int e = errno;
        free(p);
        errno = e;
        return NULL;
    }
    pthread_mutex_init(&p->mtx, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->ev = event_new(base, p->efd, EV_READ | EV_PERSIST, port_cb, p);
    event_add(p->ev, NULL);
    return p;
}

void
gw_tport_hold(gw_tport_t *port)
{
    port->pending++;
}

void
gw_tport_unhold(gw_tport_t *port)
{
    port->pending--;
}

void
gw_tport_return(gw_tjob_t *job)
{
    port_return(job);
}

unsigned
gw_tport_pending(const gw_tport_t *port)
{
    return port->pending;
}

void
gw_tport_free(gw_tport_t *p)
{
    if (p == NULL)
        return;
    while (p->pending > 0) {
        pthread_mutex_lock(&p->mtx);
        while (p->head == NULL)
            pthread_cond_wait(&p->cv, &p->mtx);
        pthread_mutex_unlock(&p->mtx);
        port_drain(p, true);
    }
    event_free(p->ev);
    close(p->efd);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mtx);
    free(p);
}
