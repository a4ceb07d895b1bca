// Renders Ollama TEMPLATEs with Go's own text/template, as Ollama's server does for a chat request: the template
// parsed with missingkey=zero and Ollama's one extra function (json), executed over System (the system messages'
// text) and Messages (consecutive messages of one role merged, as Ollama collates them).
// Input on stdin: a JSON list of {"template": "...", "messages": [{"role": "...", "content": "..."}]};
// output on stdout: a JSON list of {"text": "..."} or {"error": "..."}, one per input.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

type Result struct {
	Text  *string `json:"text,omitempty"`
	Error string  `json:"error,omitempty"`
}

func collate(messages []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range messages {
		m := messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func render(c Case) Result {
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return Result{Error: err.Error()}
	}
	system, messages := collate(c.Messages)
	var b bytes.Buffer
	data := map[string]any{"System": system, "Messages": messages, "Tools": nil, "Response": "", "Think": false}
	if err := t.Execute(&b, data); err != nil {
		return Result{Error: err.Error()}
	}
	text := b.String()
	return Result{Text: &text}
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
	results := make([]Result, len(cases))
	for i, c := range cases {
		results[i] = render(c)
	}
	json.NewEncoder(os.Stdout).Encode(results)
}
