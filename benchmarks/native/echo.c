/*
 * A minimal native epoll echo server: the ceiling in benchmarks/suite.py.
 *
 * One thread, no Python, level-triggered epoll, non-blocking sockets. A
 * readable connection gets one read of up to BUF_SIZE bytes into a shared
 * buffer, sent straight back. What the socket does not take at once is
 * queued in that connection's own buffer and sent on EPOLLOUT; new input is
 * queued behind it, so the bytes go back in order and none is lost. Reading
 * stops while HIGH_WATER bytes or more are queued (TCP then slows the
 * client), so a client that does not read costs at most HIGH_WATER +
 * BUF_SIZE bytes here. An idle connection holds no buffer. On EOF the
 * queued bytes are sent, then the connection is closed.
 *
 * Usage: echo [PORT]   (default 0: a free port). Listens on 127.0.0.1 and
 * prints "ready PORT native" on stdout once it does. Runs until killed.
 *
 * Built by benchmarks/suite.py with `cc -O2`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Bytes per read: more than a whole 64 KiB request. */
#define BUF_SIZE (256 * 1024)
/* Stop reading a connection while this much waits to be sent (as asyncio's
 * transports keep reading while their write buffer is small). */
#define HIGH_WATER (1024 * 1024)
#define MAX_EVENTS 512

struct conn {
    int open;
    int eof;          /* the client shut down its side: close once drained */
    uint32_t events;  /* what epoll watches for */
    char *queue;      /* bytes not yet sent: queue[off..len]; NULL when empty */
    size_t off, len, cap;
};

static struct conn *conns; /* indexed by fd */
static size_t max_fds;
static int epfd;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void close_conn(int fd)
{
    /* Closing removes the fd from the epoll set: no other process has it. */
    free(conns[fd].queue);
    conns[fd] = (struct conn){0};
    close(fd);
}

/* Watches for what the connection needs now: input unless too much is
 * queued (or the client has sent EOF), output while anything is queued. */
static void update_events(int fd)
{
    struct conn *c = &conns[fd];
    size_t queued = c->len - c->off;
    uint32_t want = 0;
    if (!c->eof && queued < HIGH_WATER)
        want |= EPOLLIN;
    if (queued)
        want |= EPOLLOUT;
    if (want == c->events)
        return;
    struct epoll_event ev = {.events = want, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) < 0)
        die("epoll_ctl");
    c->events = want;
}

/* Sends from data[0..len] what the socket takes; returns how much, or -1 if
 * the connection failed. */
static ssize_t send_some(int fd, const char *data, size_t len)
{
    size_t sent = 0;
    while (sent < len) {
        ssize_t n = send(fd, data + sent, len - sent, MSG_NOSIGNAL);
        if (n > 0)
            sent += (size_t)n;
        else if (n < 0 && errno == EINTR)
            continue;
        else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        else
            return -1;
    }
    return (ssize_t)sent;
}

static void enqueue(struct conn *c, const char *data, size_t len)
{
    if (c->off) { /* move the unsent bytes to the front first */
        memmove(c->queue, c->queue + c->off, c->len - c->off);
        c->len -= c->off;
        c->off = 0;
    }
    if (c->len + len > c->cap) {
        size_t cap = c->cap ? c->cap : BUF_SIZE;
        while (cap < c->len + len)
            cap *= 2;
        char *grown = realloc(c->queue, cap);
        if (!grown)
            die("realloc");
        c->queue = grown;
        c->cap = cap;
    }
    memcpy(c->queue + c->len, data, len);
    c->len += len;
}

/* Sends what is queued; frees the queue once empty. Returns -1 if the
 * connection is gone (closed here). */
static int flush(int fd)
{
    struct conn *c = &conns[fd];
    if (c->off < c->len) {
        ssize_t n = send_some(fd, c->queue + c->off, c->len - c->off);
        if (n < 0) {
            close_conn(fd);
            return -1;
        }
        c->off += (size_t)n;
    }
    if (c->off == c->len) {
        free(c->queue);
        c->queue = NULL;
        c->off = c->len = c->cap = 0;
        if (c->eof) {
            close_conn(fd);
            return -1;
        }
    }
    update_events(fd);
    return 0;
}

static void on_readable(int fd, char *buf)
{
    struct conn *c = &conns[fd];
    ssize_t n;
    do {
        n = recv(fd, buf, BUF_SIZE, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    if (n < 0) {
        close_conn(fd);
        return;
    }
    if (n == 0) { /* EOF: send what is queued, then close */
        c->eof = 1;
        flush(fd);
        return;
    }
    if (c->off == c->len) { /* nothing queued: send straight from buf */
        ssize_t sent = send_some(fd, buf, (size_t)n);
        if (sent < 0) {
            close_conn(fd);
            return;
        }
        if (sent == n)
            return;
        enqueue(c, buf + sent, (size_t)(n - sent));
        update_events(fd);
    } else { /* behind what is queued, to keep the order */
        enqueue(c, buf, (size_t)n);
        flush(fd);
    }
}

static void on_listener(int listener)
{
    for (;;) {
        int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EMFILE || errno == ENFILE) {
                /* Out of descriptors: the listener stays readable, so pause
                 * briefly rather than spin. */
                perror("accept4");
                nanosleep(&(struct timespec){.tv_nsec = 10 * 1000 * 1000}, NULL);
                return;
            }
            die("accept4");
        }
        if ((size_t)fd >= max_fds) { /* cannot happen below RLIMIT_NOFILE */
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[fd] = (struct conn){.open = 1, .events = EPOLLIN};
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            die("epoll_ctl");
    }
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 0;

    /* As many descriptors as allowed (the suite's idle cells need them). */
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) < 0)
        die("getrlimit");
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
    getrlimit(RLIMIT_NOFILE, &lim);
    max_fds = lim.rlim_cur == RLIM_INFINITY ? 1 << 20 : (size_t)lim.rlim_cur;
    /* calloc'd pages count in RSS only once a connection uses them. */
    conns = calloc(max_fds, sizeof *conns);
    char *buf = malloc(BUF_SIZE);
    if (!conns || !buf)
        die("calloc");

    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listener < 0)
        die("socket");
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    if (listen(listener, SOMAXCONN) < 0)
        die("listen");
    socklen_t addr_len = sizeof addr;
    if (getsockname(listener, (struct sockaddr *)&addr, &addr_len) < 0)
        die("getsockname");

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = listener};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &lev) < 0)
        die("epoll_ctl");
    printf("ready %d native\n", ntohs(addr.sin_port));
    fflush(stdout);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            uint32_t ev = events[i].events;
            if (fd == listener) {
                on_listener(listener);
                continue;
            }
            /* Output first: it makes room, and an error or hang-up shows
             * there too. */
            if (conns[fd].queue && (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && flush(fd) < 0)
                continue;
            if (conns[fd].open && (conns[fd].events & EPOLLIN) &&
                (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                on_readable(fd, buf);
        }
    }
}
