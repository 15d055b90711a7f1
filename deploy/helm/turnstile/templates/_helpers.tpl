{{/* Labels on every object. */}}
{{- define "turnstile.labels" -}}
app.kubernetes.io/name: turnstile
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* What selects the gateway pods: Service, PDB, policies, ServiceMonitor. */}}
{{- define "turnstile.gatewaySelector" -}}
app.kubernetes.io/name: turnstile
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "turnstile.redisSelector" -}}
app.kubernetes.io/name: turnstile
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "turnstile.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The Secret holding Redis's password: the operator's, or the one the chart makes. */}}
{{- define "turnstile.redisSecret" -}}
{{ .Values.redis.existingSecret | default (printf "%s-redis" .Release.Name) }}
{{- end }}

{{/* Whether the gateways get REDIS_PASSWORD (and the bundled Redis requires it). */}}
{{- define "turnstile.redisPassword" -}}
{{ if or .Values.redis.bundled .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/* TURNSTILE_REDIS_URL; empty without any Redis (limits are then counted per replica). */}}
{{- define "turnstile.redisUrl" -}}
{{- if .Values.redis.url -}}
{{ .Values.redis.url }}
{{- else if .Values.redis.bundled -}}
redis://{{ .Release.Name }}-redis.{{ .Release.Namespace }}.svc.cluster.local:6379/
{{- end }}
{{- end }}

{{- define "turnstile.daemonset" -}}
{{- if eq .Values.mode "daemonset" }}true{{ else if eq .Values.mode "userspace" }}{{ else }}{{ fail (printf "mode must be daemonset or userspace, not %q" .Values.mode) }}{{ end }}
{{- end }}
