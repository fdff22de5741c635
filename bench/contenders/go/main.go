// Reference: a Go net/http SSE server, the textbook way: one fmt.Fprintf per
// event, then http.Flusher.Flush so the client sees it now.
//
//	go build -o /tmp/ref-go main.go
//	/tmp/ref-go [-host H] [-port P] [-keep] [SOURCE]
//
// Without -keep each request streams SOURCE (a file, or - for stdin) from its
// start; with -keep one reader broadcasts stdin to every connected client,
// each client having its own buffered channel.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
)

func setHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	h.Set("X-Accel-Buffering", "no")
}

func openSource(source string) (io.ReadCloser, error) {
	if source == "" || source == "-" {
		return io.NopCloser(os.Stdin), nil
	}
	return os.Open(source)
}

func newScanner(r io.Reader) *bufio.Scanner {
	scanner := bufio.NewScanner(r)
	scanner.Buffer(make([]byte, 256*1024), 16*1024*1024) // long lines must not end a stream
	return scanner
}

// streamSource serves each request the whole source, one event per line.
func streamSource(source string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		flusher, ok := w.(http.Flusher)
		if !ok {
			http.Error(w, "streaming unsupported", http.StatusInternalServerError)
			return
		}
		in, err := openSource(source)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer in.Close()
		setHeaders(w)
		w.WriteHeader(http.StatusOK)
		flusher.Flush()
		scanner := newScanner(in)
		for id := 1; scanner.Scan(); id++ {
			if _, err := fmt.Fprintf(w, "id: %d\ndata: %s\n\n", id, scanner.Bytes()); err != nil {
				return // the client went away
			}
			flusher.Flush()
		}
	}
}

// hub broadcasts each line of its source, encoded once, to every client.
type hub struct {
	mu      sync.Mutex
	clients map[chan []byte]struct{}
}

func (h *hub) run(in io.Reader) {
	scanner := newScanner(in)
	for id := 1; scanner.Scan(); id++ {
		event := []byte("id: " + strconv.Itoa(id) + "\ndata: " + scanner.Text() + "\n\n")
		h.mu.Lock()
		for ch := range h.clients {
			select {
			case ch <- event:
			default: // a client this far behind misses the event rather than stall the others
			}
		}
		h.mu.Unlock()
	}
	h.mu.Lock()
	for ch := range h.clients {
		close(ch)
	}
	h.clients = nil
	h.mu.Unlock()
}

func (h *hub) serve(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	ch := make(chan []byte, 256)
	h.mu.Lock()
	if h.clients == nil {
		h.mu.Unlock()
		http.Error(w, "stream ended", http.StatusGone)
		return
	}
	h.clients[ch] = struct{}{}
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.clients, ch)
		h.mu.Unlock()
	}()
	setHeaders(w)
	w.WriteHeader(http.StatusOK)
	flusher.Flush()
	for {
		select {
		case event, open := <-ch:
			if !open {
				return
			}
			if _, err := w.Write(event); err != nil {
				return
			}
			flusher.Flush()
		case <-r.Context().Done():
			return
		}
	}
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 8000, "port to listen on; 0 picks a free one")
	keep := flag.Bool("keep", false, "broadcast stdin to every connected client")
	flag.Parse()
	source := flag.Arg(0)

	listener, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		log.Fatal(err)
	}
	var handler http.HandlerFunc
	if *keep {
		h := &hub{clients: map[chan []byte]struct{}{}}
		in, err := openSource(source)
		if err != nil {
			log.Fatal(err)
		}
		go h.run(in)
		handler = h.serve
	} else {
		handler = streamSource(source)
	}
	fmt.Fprintf(os.Stderr, "ref-go: serving on http://%s/\n", listener.Addr())
	log.Fatal(http.Serve(listener, handler))
}
