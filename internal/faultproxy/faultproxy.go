// Package faultproxy is a test tool: a TCP proxy placed on one link between
// a client (a swo node) and a database server, through which tests inject
// network faults on that link alone. The library never uses it.
//
// A Proxy listens on a loopback port (Addr; URL rewrites a database URL to
// go through it) and forwards every connection it accepts to its target.
// Its controls act at once, on the connections already open and on later
// ones:
//
//	SetLatency  every byte is delivered that long after it was read, in each
//	            direction (a round trip costs twice the latency; throughput
//	            is not limited: bytes in flight are queued, not serialised)
//	Blackhole   a partition: connections are accepted and kept open, but no
//	            byte moves in either direction (and connections accepted
//	            meanwhile are not dialled through) until it ends
//	CutAll      every current connection is closed on both sides
//	Refuse      new connections are reset as soon as they are accepted; open
//	            ones are untouched
//
// Invariants:
//
//   - Bytes are forwarded unaltered, in order, in each direction
//     independently. None is dropped while a connection lives: a blackhole
//     holds them and delivers them when it ends, as TCP does once a
//     partition heals (a peer's close, too, is delivered only then).
//   - A connection ends on both sides together: when either peer closes it
//     or fails, when CutAll or Close cut it.
//   - Close stops accepting, cuts every connection and returns once every
//     goroutine the proxy started has ended.
//   - Every method is safe for concurrent use.
package faultproxy

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"
)

// dialTimeout bounds the dial of the target for one accepted connection.
const dialTimeout = 10 * time.Second

// chunkSize is the largest read forwarded as one piece; queued is how many
// pieces one direction of a connection holds before its reader waits (the
// back-pressure a full TCP window gives).
const (
	chunkSize = 32 << 10
	queued    = 64
)

// Proxy is a TCP proxy in front of one target address, with fault
// controls. Create it with New; Close it when done.
type Proxy struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup // the accept loop and every connection's goroutines

	mu      sync.Mutex
	latency time.Duration
	refuse  bool
	open    chan struct{} // closed while bytes flow; open (blocking) during a blackhole
	links   map[*link]struct{}
	closed  bool
}

// link is one proxied connection: the client's side and, once dialled, the
// target's.
type link struct {
	client net.Conn
	once   sync.Once
	done   chan struct{} // closed when the link is cut

	mu       sync.Mutex
	upstream net.Conn
}

// New starts a proxy on a free loopback port that forwards to target
// (host:port).
func New(target string) (*Proxy, error) {
	if _, _, err := net.SplitHostPort(target); err != nil {
		return nil, fmt.Errorf("faultproxy: target %q: %w", target, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("faultproxy: listen: %w", err)
	}
	open := make(chan struct{})
	close(open)
	p := &Proxy{target: target, ln: ln, open: open, links: map[*link]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's address (host:port): connect there instead of the
// target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Target is the address the proxy forwards to.
func (p *Proxy) Target() string { return p.target }

// URL returns dbURL (a postgres:// URL) with its host and port replaced by
// the proxy's: a connection made with it goes through the proxy.
func (p *Proxy) URL(dbURL string) (string, error) { return RewriteURL(dbURL, p.Addr()) }

// RewriteURL returns dbURL, a URL of the form scheme://[user[:password]@]host[:port]/...,
// with host and port replaced by addr (host:port); everything else (user,
// password, database, parameters) is kept. Keyword/value connection strings
// and URLs naming several hosts are refused.
func RewriteURL(dbURL, addr string) (string, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", fmt.Errorf("faultproxy: address %q: %w", addr, err)
	}
	u, err := url.Parse(dbURL)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return "", errors.New("faultproxy: not a URL with a host (scheme://host:port/...)")
	}
	if strings.Contains(u.Host, ",") {
		return "", errors.New("faultproxy: a URL with several hosts cannot go through one proxy")
	}
	if u.Query().Has("host") || u.Query().Has("port") || u.Query().Has("hostaddr") {
		return "", errors.New("faultproxy: the URL names its host or port in a parameter")
	}
	u.Host = addr
	return u.String(), nil
}

// SetLatency sets the delay added to each direction's forwarding: a byte
// read from one side is written to the other d later (0: none). It applies
// to bytes read from now on, on every connection.
func (p *Proxy) SetLatency(d time.Duration) {
	p.mu.Lock()
	p.latency = max(d, 0)
	p.mu.Unlock()
}

// Blackhole starts (on) or ends (off) a partition: while it lasts, no byte
// is forwarded in either direction and connections accepted meanwhile are
// held, unanswered, without being dialled through; nothing is closed. When
// it ends, what was held flows again.
func (p *Proxy) Blackhole(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open: // bytes flow now
		if on {
			p.open = make(chan struct{})
		}
	default: // blackholed now
		if !on {
			close(p.open)
		}
	}
}

// Refuse makes the proxy reset every new connection as soon as it is
// accepted (on), or accept them again (off). Open connections are not
// touched.
func (p *Proxy) Refuse(on bool) {
	p.mu.Lock()
	p.refuse = on
	p.mu.Unlock()
}

// CutAll closes every current connection on both sides (the proxy goes on
// accepting new ones, subject to Refuse and Blackhole).
func (p *Proxy) CutAll() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.cut()
	}
}

// Active is the number of connections open through the proxy.
func (p *Proxy) Active() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Close stops accepting, cuts every connection and waits for every
// goroutine of the proxy to end. Closing twice is harmless.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.CutAll()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(5 * time.Millisecond) // a transient error (too many files): try again
			continue
		}
		p.mu.Lock()
		if p.closed || p.refuse {
			p.mu.Unlock()
			reset(c)
			continue
		}
		l := &link{client: c, done: make(chan struct{})}
		p.links[l] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(l)
	}
}

// reset closes c so that its peer sees a reset rather than an orderly end.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// serve dials the target for one accepted connection (once no blackhole
// holds it) and forwards both directions until the link is cut.
func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	defer p.forget(l)
	if !p.flowing(l.done) {
		return
	}
	up, err := net.DialTimeout("tcp", p.target, dialTimeout)
	if err != nil {
		l.cut()
		return
	}
	if !l.attach(up) {
		return // cut while dialling
	}
	var dirs sync.WaitGroup
	dirs.Add(2)
	go func() { defer dirs.Done(); p.forward(l, l.client, up) }()
	go func() { defer dirs.Done(); p.forward(l, up, l.client) }()
	dirs.Wait()
}

func (p *Proxy) forget(l *link) {
	l.cut()
	p.mu.Lock()
	delete(p.links, l)
	p.mu.Unlock()
}

// gate returns the channel that is closed while bytes may flow.
func (p *Proxy) gate() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.open
}

// flowing waits until no blackhole holds the proxy; false if done closed first.
func (p *Proxy) flowing(done <-chan struct{}) bool {
	for {
		g := p.gate()
		select {
		case <-g:
			// The blackhole may have started again between the read of the
			// gate and now: look once more.
			if p.gate() == g {
				return true
			}
		case <-done:
			return false
		}
	}
}

func (p *Proxy) currentLatency() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.latency
}

// chunk is bytes read from one side, due on the other at due.
type chunk struct {
	data []byte
	due  time.Time
}

// forward moves bytes from src to dst: a reader queues what it reads with
// the time it is due; the writer delivers each piece at its time, once no
// blackhole holds it. When src ends (or dst fails) the link is cut, after
// what was read has been delivered.
func (p *Proxy) forward(l *link, src, dst net.Conn) {
	queue := make(chan chunk, queued)
	read := make(chan struct{})
	go func() {
		defer close(read)
		defer close(queue)
		for {
			buf := make([]byte, chunkSize)
			n, err := src.Read(buf)
			if n > 0 {
				select {
				case queue <- chunk{data: buf[:n], due: time.Now().Add(p.currentLatency())}:
				case <-l.done:
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	defer func() {
		l.cut() // ends the reader's Read, or its wait to queue
		<-read
	}()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for c := range queue {
		if wait := time.Until(c.due); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-l.done:
				return
			}
		}
		if !p.flowing(l.done) {
			return
		}
		if _, err := dst.Write(c.data); err != nil {
			return
		}
	}
}

// attach records the dialled target side; false (and up closed) if the link
// was cut meanwhile.
func (l *link) attach(up net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.done:
		_ = up.Close()
		return false
	default:
	}
	l.upstream = up
	return true
}

// cut closes both sides of the link (once).
func (l *link) cut() {
	l.once.Do(func() {
		l.mu.Lock()
		close(l.done)
		up := l.upstream
		l.mu.Unlock()
		_ = l.client.Close()
		if up != nil {
			_ = up.Close()
		}
	})
}
