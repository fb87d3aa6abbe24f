{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "qserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name: the release name, suffixed with the chart name unless it already holds it. */}}
{{- define "qserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "qserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "qserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Secret holding the API key and admin token, when auth is configured. */}}
{{- define "qserve.secretName" -}}
{{- default (include "qserve.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "qserve.authEnabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.apiKey .Values.auth.adminToken }}true{{ end }}
{{- end }}
